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

import pytest

from streamsched import subjects
from streamsched.config import GIB, Settings
from streamsched.transport import definitions, streams

SNAPSHOT = Path(__file__).parents[1] / "fixtures" / "stream_configs.json"
FOLDER = Path(str(definitions.folder()))
#: Settings whose definitions are recorded: the defaults, two regions, a cluster's three
#: replicas, and every setting a definition reads set apart from the others (so a
#: definition that reads the wrong setting cannot pass by two defaults being equal).
CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "two regions": {"regions": ("default", "eu")},
    "replicas 3": {"replicas": 3},
    "three projector partitions": {"projector_partitions": 3},
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


def configs_of(settings: Settings) -> dict[str, Any]:
    """The configs as JSON data; streams and buckets by name (their order does not matter:
    each is made on its own), consumers in order (it is the order of their permissions in
    ``access render``)."""
    return {
        "streams": {config.name: plain(config) for config in streams.stream_configs(settings)},
        "kv": {config.bucket: plain(config) for config in streams.kv_configs(settings)},
        "consumers": [[stream, plain(config)] for stream, config in streams.consumer_configs(settings)],
        "work_consumers": [
            plain(streams.work_consumer_config(settings, region, priority, task_type))
            for region in settings.regions
            for priority in settings.priorities
            for task_type in TASK_TYPES
        ],
    }


def recorded() -> dict[str, Any]:
    return {name: configs_of(Settings(**overrides)) for name, overrides in CASES.items()}


def test_the_definitions_are_the_recorded_ones_for_every_case() -> None:
    expected = json.loads(SNAPSHOT.read_text())
    assert set(expected) == set(CASES)
    for name, overrides in CASES.items():
        # Through JSON, as the record was written: a float stays the same float, an enum its value.
        assert json.loads(json.dumps(configs_of(Settings(**overrides)))) == expected[name], name


def test_the_check_sees_one_changed_field() -> None:
    changed = configs_of(Settings())
    changed["streams"]["TASKS"]["max_msg_size"] += 1
    assert json.loads(json.dumps(changed)) != json.loads(SNAPSHOT.read_text())["default"]


def test_a_placeholder_alone_is_its_value_and_within_text_its_text() -> None:
    filled = definitions.fill({"a": "${n}", "b": "x-${n}-${s}", "c": [1, "${s}"]}, {"n": 3, "s": "y"}, {})
    assert filled == {"a": 3, "b": "x-3-y", "c": [1, "y"]}
    with pytest.raises(KeyError):
        definitions.fill({"a": "${nowhere}"}, {}, {})


def test_a_list_item_naming_a_region_or_priority_repeats_regions_outer() -> None:
    repeated = {"region": ("r1", "r2"), "priority": ("high", "low")}
    assert definitions.fill(["plain", "s.${priority}"], {}, repeated) == ["plain", "s.high", "s.low"]
    assert definitions.fill([{"name": "${region}-${priority}"}], {}, repeated) == [{"name": n} for n in ("r1-high", "r1-low", "r2-high", "r2-low")]
    # A value given for one (a worker's own region) is used, not repeated.
    assert definitions.fill(["${region}.${priority}"], {"region": "r2"}, repeated) == ["r2.high", "r2.low"]


def test_every_definition_file_is_read_and_names_what_subjects_names() -> None:
    settings = Settings(regions=("us", "eu"))
    on_disk = {str(path.relative_to(FOLDER)) for path in FOLDER.rglob("*.json")}
    read = {f"{kind}/{stem}.json" for kind in ("stream", "kv", "consumer") for stem, _ in definitions.read(kind)}
    assert on_disk == read and streams.WORK_CONSUMER_FILE in read
    assert {f"stream/{config.name}.json" for config in streams.stream_configs(settings)} == {p for p in read if p.startswith("stream/")}
    assert {f"kv/{kv.bucket}.json" for kv in streams.kv_configs(settings)} == {p for p in read if p.startswith("kv/")}
    # The workers' durables are found by subjects.work_consumer: the file must spell the same names.
    for task_type in ("echo", "emails.send", "a/b:c", "a_b", "a.b", "x" * 80):
        config = streams.work_consumer_config(settings, "eu", "low", task_type)
        assert config.durable_name == subjects.work_consumer("eu", "low", task_type)
        assert config.filter_subject == subjects.work("eu", "low", task_type)
    by_name = {config.durable_name: (stream, config.filter_subject) for stream, config in streams.consumer_configs(settings)}
    assert by_name[subjects.sched_consumer("eu", "low")] == (subjects.SCHED_STREAM, subjects.sched("eu", "low"))
    assert by_name[subjects.master_consumer("high")] == (subjects.TASKS_STREAM, subjects.submit("high"))
    assert by_name[subjects.PROJECTOR_CONSUMER] == (subjects.EVENTS_STREAM, subjects.EVENTS_ALL)


def test_projector_partitions_have_a_durable_each_on_their_subjects_and_partition_zero_also_the_unpartitioned() -> None:
    """With partitions, the recorders publish a task's events on ``events.<source>.<k>``: the
    durable of ``k`` must take exactly those, and partition 0's also ``events.<source>``
    (what tools publish without a partition), so that no event goes unfolded."""
    filters = {
        config.durable_name: config.filter_subjects or [config.filter_subject]
        for stream, config in streams.consumer_configs(Settings(projector_partitions=3))
        if stream == subjects.EVENTS_STREAM
    }
    assert list(filters) == subjects.projector_consumers(3) == ["projector-0", "projector-1", "projector-2"]
    assert filters == {"projector-0": ["events.*.0", "events.*"], "projector-1": ["events.*.1"], "projector-2": ["events.*.2"]}
    assert all(subjects.is_projector_consumer(name) for name in filters) and not subjects.is_projector_consumer("projector-x")


def test_the_top_level_streams_folder_is_the_packages() -> None:
    top = Path(__file__).parents[2] / "streams"
    assert top.resolve() == FOLDER.resolve()


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(recorded(), indent=1, sort_keys=True) + "\n")
