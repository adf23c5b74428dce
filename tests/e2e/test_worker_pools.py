"""Two worker processes with different handler modules in one region each run only their own
tasks: 200 of each module's types, none retried or dead-lettered."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import msgspec
import pytest

from streamsched import subjects
from streamsched.testing import EventLog
from streamsched.transport.bus import Bus

from .conftest import Processes, worker_id

pytestmark = pytest.mark.anyio

MODULES = {
    "billing_handlers": ("billing.charge", "billing.refund"),
    "reports_handlers": ("reports.build", "reports.export"),
}


def write_modules(where: Path) -> None:
    for module, types in MODULES.items():
        handlers = "\n".join(f'@task("{task_type}")\nasync def handler_{n}(payload):\n    return payload\n' for n, task_type in enumerate(types))
        (where / f"{module}.py").write_text(textwrap.dedent("from streamsched import task\n\n") + handlers)


async def test_two_worker_processes_with_different_handler_modules_run_200_tasks_of_each_with_no_dead_task(
    processes: Processes, schedulers: None, bus: Bus, events: EventLog, tmp_path: Path
):
    write_modules(tmp_path)
    processes.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), processes.env.get("PYTHONPATH")]))
    pools = {module: processes.start(module, "worker", module, "--region", "default", "--concurrency", "8") for module in MODULES}
    owner = {task_type: worker_id(pools[module]) for module, types in MODULES.items() for task_type in types}
    submissions = []
    for n in range(100):
        for task_type in owner:
            body = {"id": f"{task_type.replace('.', '_')}-{n}", "type": task_type, "payload": n}  # an id takes no dots
            submissions.append((subjects.SUBMIT, msgspec.json.encode(body), None))
    failed, _ = await bus.publish_many(submissions)
    assert failed == 0
    await events.wait_count("succeeded", len(submissions), timeout_s=60)
    for event in events.of_kind("started"):
        task_type = event.task_id.rsplit("-", 1)[0].replace("_", ".")
        assert event.worker == owner[task_type], f"{event.task_id} ran on {event.worker}\n{processes.logs()}"
    assert not events.of_kind("retrying") and not events.of_kind("dead") and not events.of_kind("failed")
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 0
