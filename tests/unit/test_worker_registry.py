"""The worker registry's pure parts: keys, staleness, the heartbeat setting, the `workers list` table."""

from __future__ import annotations

import pytest

from streamsched import subjects
from streamsched.cli import Exit
from streamsched.cli_workers import NOT_FOUND, TIMEOUT, table
from streamsched.config import Settings
from streamsched.errors import ConfigError
from streamsched.roles.worker_registry import WorkerInfo
from streamsched.transport.streams import kv_configs

NOW = 1_700_000_000.0


def info(**fields: object) -> WorkerInfo:
    base: dict[str, object] = dict(
        id="box-7",
        host="box",
        pid=7,
        region="default",
        types=("echo", "sleep"),
        concurrency=4,
        prefetch=4,
        version="0.1.0",
        started_at=NOW - 185,
        heartbeat_at=NOW - 0.5,
        heartbeat_s=2.0,
    )
    return WorkerInfo(**{**base, **fields})


def test_a_worker_key_is_one_valid_token_whatever_the_host_name_and_keeps_a_valid_one():
    key = subjects.worker_key("build.example.com-4242")
    assert key == "build_example_com-4242" and subjects.is_token(key)
    assert subjects.worker_key(key) == key
    assert subjects.worker_drain("build.example.com-4242") == "streamsched.workers.build_example_com-4242.drain"


def test_an_entry_is_live_for_three_of_its_own_heartbeats():
    entry = info(heartbeat_at=NOW, heartbeat_s=0.5)
    assert entry.is_live(NOW + 1.49) and not entry.is_live(NOW + 1.5)
    assert entry.key == "box-7"


def test_the_heartbeat_setting_is_read_from_the_environment_sets_the_bucket_ttl_and_must_be_at_least_a_tenth_of_a_second():
    settings = Settings.load({"STREAMSCHED_WORKER_HEARTBEAT_S": "0.5"})
    assert settings.worker_heartbeat_s == 0.5
    [workers] = [kv for kv in kv_configs(settings) if kv.bucket == subjects.WORKERS_BUCKET]
    assert workers.ttl == 1.5
    for bad in ("0", "-1", "0.05", "nan"):
        with pytest.raises(ConfigError, match=r"worker_heartbeat_s must be at least 0\.1"):
            Settings.load({"STREAMSCHED_WORKER_HEARTBEAT_S": bad})


def test_the_table_shows_load_finished_counts_age_and_last_heartbeat_in_aligned_columns():
    rows = [
        info(running=3, waiting=2, finished={"succeeded": 12, "retrying": 0, "failed": 1}),
        info(id="other-host-99", region="eu", types=(), state="draining", started_at=NOW - 2 * 86400 - 3 * 3600, heartbeat_at=NOW - 1.25),
    ]
    lines = table(rows, NOW).splitlines()
    assert lines[0].split() == ["ID", "REGION", "TYPES", "STATE", "RUNNING", "WAITING", "FINISHED", "AGE", "HEARTBEAT"]
    assert lines[1].split() == ["box-7", "default", "echo,sleep", "running", "3/4", "2", "succeeded", "12", "failed", "1", "3m05s", "0.5s", "ago"]
    assert lines[2].split() == ["other-host-99", "eu", "-", "draining", "0/4", "0", "-", "2d03h", "1.2s", "ago"]
    assert lines[0].index("REGION") == lines[1].index("default") == lines[2].index("eu")
    assert lines[0].index("AGE") == lines[1].index("3m05s") == lines[2].index("2d03h")


def test_the_workers_commands_exit_with_the_codes_the_cli_names():
    assert (NOT_FOUND, TIMEOUT) == (Exit.NOT_FOUND, Exit.TIMEOUT)
