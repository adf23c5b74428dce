"""Projector partitions: which partition a task's events go to, and which durable a
projector started with ``--partition`` reads."""

from __future__ import annotations

import collections

import pytest
from typer.testing import CliRunner

from streamsched import access, subjects, up
from streamsched.cli import app
from streamsched.config import ConfigError, Settings


def test_a_tasks_partition_is_a_stable_hash_of_its_id_spreading_ids_evenly() -> None:
    # Fixed values: every process (and version) must put a task's events in the same partition.
    assert [subjects.event_partition(task_id, 4) for task_id in ("a", "task-1", "0f8e1c")] == [3, 3, 2]
    counts = collections.Counter(subjects.event_partition(f"t{i}", 4) for i in range(10_000))
    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 2_300


def test_events_subjects_and_durables_with_and_without_partitions() -> None:
    assert subjects.events("worker") == "events.worker" and subjects.events("worker", 2) == "events.worker.2"
    assert subjects.projector_consumers(1) == ["projector"]
    assert subjects.projector_consumers(2) == ["projector-0", "projector-1"]


@pytest.mark.parametrize("partitions", [0, 65])
def test_a_partition_count_out_of_range_is_refused(partitions: int) -> None:
    with pytest.raises(ConfigError, match="projector_partitions must be 1 to 64"):
        Settings.load({}, projector_partitions=partitions)


@pytest.mark.parametrize(
    ("partitions", "args", "error"),
    [
        ("1", ["--partition", "0"], "--partition needs STREAMSCHED_PROJECTOR_PARTITIONS above 1"),
        ("3", [], "no --partition: STREAMSCHED_PROJECTOR_PARTITIONS is 3, so give --partition 0 to 2"),
        ("3", ["--partition", "3"], "--partition 3: STREAMSCHED_PROJECTOR_PARTITIONS is 3, so give --partition 0 to 2"),
    ],
)
def test_a_projector_must_name_one_of_the_partitions_when_there_are_several(partitions: str, args: list[str], error: str) -> None:
    result = CliRunner().invoke(app, ["projector", *args], env={"STREAMSCHED_PROJECTOR_PARTITIONS": partitions})
    assert result.exit_code == 2 and error in result.output, result.output


def test_projectors_may_pull_every_partitions_durable_and_recorders_publish_on_partition_subjects() -> None:
    settings = Settings(projector_partitions=2)
    projector = access.projector_grant(settings).publish
    assert {f"$JS.API.CONSUMER.MSG.NEXT.EVENTS.projector-{k}" for k in range(2)} <= set(projector)
    assert "$JS.API.CONSUMER.MSG.NEXT.EVENTS.projector" not in projector
    for grant in (access.worker_grant(settings, "default", None), access.regional_grant(settings, "default"), access.master_grant(settings)):
        assert {"events.*", "events.*.*"} <= set(grant.publish)
    # Nobody but the admin makes or changes the partitions' durables (a client could otherwise refilter one).
    assert {f"$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.projector-{k}" for k in range(2)} <= set(access.durable_guard(settings))


@pytest.mark.parametrize(
    ("env", "args", "started"),
    [({"STREAMSCHED_PROJECTOR_PARTITIONS": "3"}, [], 3), ({}, ["--projectors", "2"], 2), ({}, [], 1)],
)
def test_up_runs_a_projector_per_partition_of_the_setting_or_of_projectors(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str], started: int
) -> None:
    chosen = []
    monkeypatch.setattr(up, "run", lambda settings, options: chosen.append(options.projectors) or True)
    monkeypatch.delenv("STREAMSCHED_PROJECTOR_PARTITIONS", raising=False)
    result = CliRunner().invoke(app, ["up", "--api-port", "0", *args], env=env)
    assert result.exit_code == 0 and chosen == [started], result.output


def test_up_refuses_a_projectors_count_other_than_the_settings() -> None:
    result = CliRunner().invoke(app, ["up", "--projectors", "2", "--api-port", "0"], env={"STREAMSCHED_PROJECTOR_PARTITIONS": "3"})
    assert result.exit_code == 2 and "STREAMSCHED_PROJECTOR_PARTITIONS is 3: give one count, not two" in result.output, result.output
