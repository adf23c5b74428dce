"""The stream, consumer and KV definitions: for the same settings, ``stream_configs``,
``kv_configs``, ``consumer_configs`` and ``work_consumer_config`` give exactly the configs
recorded in ``tests/fixtures/stream_configs.json`` (every field of every config, so a field
that changes, appears or goes fails here).

After an intended change of a definition, write the record again with
``python tests/unit/test_stream_definitions.py`` and read its diff."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from streamsched.config import GIB, Settings
from streamsched.transport import streams

SNAPSHOT = Path(__file__).parents[1] / "fixtures" / "stream_configs.json"
#: Settings whose definitions are recorded: the defaults, two regions, a cluster's three
#: replicas, and every setting a definition reads set apart from the others (so a
#: definition that reads the wrong setting cannot pass by two defaults being equal).
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "two regions": {"regions": ("default", "eu")},
    "replicas 3": {"replicas": 3},
    "every setting apart": {
        "regions": ("us", "eu", "ap"),
        "priorities": ("urgent", "normal"),
        "replicas": 5,
        "duplicate_window_s": 61.0,
        "max_payload_bytes": 70_000,
        "master_window": 301,
        "regional_window": 302,
        "work_max_ack_pending": 303,
        "worker_heartbeat_s": 0.5,
        "ack_wait_s": 9.5,
        "max_deliver": 7,
        "tasks_max_age_s": 3600.0,
        "tasks_max_bytes": 3 * GIB,
        "queue_max_bytes": 5 * GIB,
        "events_max_age_s": 7200.0,
        "events_max_bytes": 6 * GIB,
        "dlq_max_age_s": 10800.0,
        "dlq_max_bytes": 7 * GIB,
        "state_max_bytes": 8 * GIB,
        "cancel_ttl_s": 14400.0,
    },
}
#: Task types whose WORK durables are recorded (one with a dot, spelled apart in the name).
TASK_TYPES = ("echo", "emails.send")


def plain(value: Any) -> Any:
    """``value`` (a nats-py config) as JSON data, every field kept, enums as their values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def definitions(settings: Settings) -> dict[str, Any]:
    return {
        "streams": plain(streams.stream_configs(settings)),
        "kv": plain(streams.kv_configs(settings)),
        "consumers": [[stream, plain(config)] for stream, config in streams.consumer_configs(settings)],
        "work_consumers": [
            plain(streams.work_consumer_config(settings, region, priority, task_type))
            for region in settings.regions
            for priority in settings.priorities
            for task_type in TASK_TYPES
        ],
    }


def recorded() -> dict[str, Any]:
    return {name: definitions(Settings(**overrides)) for name, overrides in CASES.items()}


def test_the_definitions_are_the_recorded_ones_for_every_case() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    assert set(expected) == set(CASES)
    for name, overrides in CASES.items():
        # Through JSON, as the record was written: a float stays the same float, an enum its value.
        assert json.loads(json.dumps(definitions(Settings(**overrides)))) == expected[name], name


def test_the_check_sees_one_changed_field() -> None:
    changed = definitions(Settings())
    changed["streams"][0]["max_msg_size"] += 1
    assert json.loads(json.dumps(changed)) != json.loads(SNAPSHOT.read_text())["default"]


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(recorded(), indent=1, sort_keys=True) + "\n")
