"""The ingress subjects: which the master reads in which order, what TASKS takes, what a
priority subject does to a body, and where our submitters publish."""

import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.errors import Rejected
from streamsched.model import decode_submission
from streamsched.roles.master import ingress_levels, with_subject_priority
from streamsched.transport import streams


def test_the_master_drains_the_priority_subjects_highest_first_with_plain_submit_after_the_default() -> None:
    assert ingress_levels(Settings()) == [("master-high", "high"), ("master-medium", "medium"), ("master", None), ("master-low", "low")]
    # Without the default priority a plain submission must name one: it comes last.
    assert ingress_levels(Settings(priorities=("p0", "p1"))) == [("master-p0", "p0"), ("master-p1", "p1"), ("master", None)]


def test_tasks_takes_plain_submit_and_the_configured_priority_subjects_only() -> None:
    settings = Settings(priorities=("p0", "p1"))
    tasks = next(config for config in streams.stream_configs(settings) if config.name == subjects.TASKS_STREAM)
    assert tasks.subjects == ["tasks.submit", "tasks.submit.p0", "tasks.submit.p1", "tasks.rejected", "tasks.cancel", "tasks.reprioritize"]
    requests = ("canceller", "reprioritizer")
    on_tasks = [config for stream, config in streams.consumer_configs(settings) if stream == "TASKS" and config.durable_name not in requests]
    ingress = {config.durable_name: config.filter_subject for config in on_tasks}
    assert ingress == {"master": "tasks.submit", "master-p0": "tasks.submit.p0", "master-p1": "tasks.submit.p1"}


def test_a_body_that_names_no_priority_gets_its_subject_s_and_one_that_names_another_is_rejected() -> None:
    data = b'{"type": "echo", "payload": {"priority": "low"}}'  # a payload's field is not the task's
    assert with_subject_priority(decode_submission(data), data, "high").priority == "high"
    data = b'{"type": "echo", "priority": "medium"}'
    with pytest.raises(Rejected, match=r"priority 'medium' in the body does not match subject tasks.submit.low \(priority 'low'\)"):
        with_subject_priority(decode_submission(data), data, "low")


def test_submit_subjects_are_recognised_and_chosen_only_for_a_known_priority() -> None:
    assert [subjects.is_submit(s) for s in ("tasks.submit", "tasks.submit.high", "tasks.submit.a.b", "tasks.rejected", "tasks.submitx")] == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert subjects.submit_for("high", ("high", "low")) == "tasks.submit.high"
    assert subjects.submit_for("urgent", ("high", "low")) == subjects.submit_for(None, ("high",)) == "tasks.submit"


def test_the_client_sends_a_message_on_its_tasks_priority_subject_when_they_share_one() -> None:
    client = Client(None, None, Settings())  # type: ignore[arg-type]  # only its settings are read
    assert client.submit_subject(["low", "low"]) == "tasks.submit.low"
    assert client.submit_subject(["low", "high"]) == "tasks.submit"  # a workflow or batch of several
    assert client.submit_subject(["urgent"]) == "tasks.submit"  # the master says why not
