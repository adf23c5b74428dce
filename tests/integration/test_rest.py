"""The REST API over a real nats-server: tasks, batches and workflows POSTed end as they do from
Python, bad bodies get 4xx naming the field, unknown ids 404, and the service endpoints answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient

from streamsched.rest import create_app
from streamsched.testing import all_roles, running, serving_http

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api(settings, bus) -> AsyncIterator[AsyncTestClient[Any]]:
    # The app connects its own client, as `streamsched api` does (it may run on a loop of its own).
    async with AsyncTestClient(app=create_app(settings)) as http:
        yield http


async def wait_status(http: AsyncTestClient[Any] | httpx.AsyncClient, task_id: str, status: str) -> dict[str, Any]:
    """The task's state once ``GET /api/v1/tasks/{id}`` shows ``status`` (an app in this process or one served over HTTP)."""
    with anyio.fail_after(15):
        while True:
            answer = await http.get(f"/api/v1/tasks/{task_id}")
            if answer.status_code == 200 and answer.json()["status"] == status:
                return dict(answer.json())
            await anyio.sleep(0.05)


async def test_a_task_posted_runs_and_its_state_and_events_are_read_back(settings, bus, examples, api):
    async with running(await all_roles(settings, bus, examples)):
        answer = await api.post("/api/v1/tasks", content=msgspec.json.encode({"type": "echo", "payload": {"n": 1}, "labels": {"via": "rest"}}))
        assert answer.status_code == 201
        (task_id,) = answer.json()["ids"]
        state = await wait_status(api, task_id, "succeeded")
        events = (await api.get(f"/api/v1/tasks/{task_id}/events")).json()
    assert state["result"] == {"n": 1} and state["labels"] == {"via": "rest"}
    assert [event["kind"] for event in events][:2] == ["submitted", "scheduled"] and events[-1]["kind"] == "succeeded"


async def test_a_batch_and_a_workflow_are_posted_like_a_task(settings, bus, examples, api):
    batch = {"batch": [{"id": "b-1", "type": "echo"}, {"id": "b-2", "type": "echo"}]}
    workflow = {"workflow": {"id": "wf", "tasks": [{"id": "a", "type": "echo"}, {"id": "b", "type": "echo", "depends_on": ["a"]}]}}
    async with running(await all_roles(settings, bus, examples)):
        assert (await api.post("/api/v1/tasks", content=msgspec.json.encode(batch))).json() == {"ids": ["b-1", "b-2"]}
        assert (await api.post("/api/v1/tasks", content=msgspec.json.encode(workflow))).json() == {"ids": ["wf"]}
        for task_id in ("b-1", "b-2", "wf-b"):
            await wait_status(api, task_id, "succeeded")
        flow = await api.get("/api/v1/workflows/wf")
    assert flow.status_code == 200 and flow.json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b'{"type": "echo", "priority": "urgent"}', "priority", "unknown priority 'urgent'"),
        (b'{"payload": 1}', "type", "missing required field"),
        (b'{"type": "echo", "max_attempts": "three"}', "max_attempts", "Expected `int | null`"),
        (b'{"type": "echo", "priorty": "high"}', "priorty", "unknown field"),
        (b"not json", None, "JSON"),
        (b'{"batch": [{"type": "echo"}, {"type": 7}]}', "batch.1.type", "task 1 of the batch is invalid"),
    ],
)
async def test_a_bad_body_is_refused_with_422_naming_the_field(api, body: bytes, field: str | None, words: str):
    answer = await api.post("/api/v1/tasks", content=body)
    assert answer.status_code == 422
    assert words in answer.json()["error"] and answer.json().get("field") == field


async def test_unknown_ids_are_404_and_a_body_over_the_limit_is_413(settings, api):
    assert (await api.get("/api/v1/tasks/nope")).status_code == 404
    assert (await api.get("/api/v1/tasks/nope/events")).status_code == 404
    assert (await api.get("/api/v1/workflows/nope")).status_code == 404
    assert (await api.post("/api/v1/tasks/nope/cancel")).status_code == 404
    assert (await api.post("/api/v1/tasks/nope/priority", content=b'{"priority": "high"}')).status_code == 404
    too_big = b'{"type": "echo", "payload": "' + b"x" * settings.max_payload_bytes + b'"}'
    answer = await api.post("/api/v1/tasks", content=too_big)
    assert answer.status_code == 413 and "over the limit" in answer.json()["error"]


async def test_cancel_and_priority_of_a_waiting_task(settings, bus, examples, api):
    async with running(await all_roles(settings, bus, examples)):
        (task_id,) = (await api.post("/api/v1/tasks", content=b'{"type": "echo", "delay_s": 30}')).json()["ids"]
        await wait_status(api, task_id, "waiting")
        bad = await api.post(f"/api/v1/tasks/{task_id}/priority", content=b'{"priority": "urgent"}')
        assert bad.status_code == 422 and "unknown priority" in bad.json()["error"]
        assert (await api.post(f"/api/v1/tasks/{task_id}/priority", content=b'{"priority": "high"}')).status_code == 202
        assert (await api.post(f"/api/v1/tasks/{task_id}/cancel", content=b'{"reason": "not needed"}')).status_code == 202
        state = await wait_status(api, task_id, "cancelled")
        again = await api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert state["error"] == "not needed" or "not needed" in str(state)
    assert again.status_code == 409


async def test_service_endpoints_answer(settings, bus, examples, api):
    assert (await api.get("/health")).json() == {"status": "ok"}
    assert (await api.get("/ready")).status_code == 200
    document = (await api.get("/openapi.json")).json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    assert {"/api/v1/tasks", "/api/v1/tasks/{task_id}", "/api/v1/cluster/stats"} <= set(paths)
    # The bodies read and written as raw JSON are described by the types that check them.
    submit_body = paths["/api/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [one["$ref"].rsplit("/", 1)[1] for one in submit_body["oneOf"]] == ["Submission", "BatchSubmission", "WorkflowSubmission"]
    assert {"type", "priority", "depends_on"} <= set(schemas["Submission"]["properties"])
    state = paths["/api/v1/tasks/{task_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert state == {"$ref": "#/components/schemas/TaskState"} and "status" in schemas["TaskState"]["properties"]
    async with running(await all_roles(settings, bus, examples)):
        workers = (await api.get("/api/v1/workers")).json()
        info = (await api.get("/api/v1/cluster/info")).json()
        stats = (await api.get("/api/v1/cluster/stats")).json()
    assert len(workers) == 1 and workers[0]["region"] == "default"
    assert info["regions"] == ["default"] and "TASKS" in info["streams"]
    assert stats["workers"] == 1 and set(stats["streams"]) >= {"TASKS", "WORK"}


async def test_tasks_are_listed_newest_first_a_page_at_a_time_with_filters(settings, bus, examples, api):
    async with running(await all_roles(settings, bus, examples)):
        for i in range(30):
            kind = {"type": "echo", "payload": i} if i % 3 else {"type": "noop"}
            task = {"id": f"t-{i:02d}", **kind, "labels": {"team": "a" if i < 10 else "b"}}
            assert (await api.post("/api/v1/tasks", content=msgspec.json.encode(task))).status_code == 201
        for i in range(30):
            await wait_status(api, f"t-{i:02d}", "succeeded")
        seen: list[str] = []
        cursor = None
        with anyio.fail_after(15):  # the view follows KV: every task is in it once all are succeeded there
            while len(seen) < 30:
                seen, cursor = [], None
                while True:
                    params = {"status": "succeeded", "limit": 7, **({"cursor": cursor} if cursor else {})}
                    page = (await api.get("/api/v1/tasks", params=params)).json()
                    seen += [task["id"] for task in page["tasks"] if task["id"].startswith("t-")]
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
        noops = (await api.get("/api/v1/tasks", params={"type": "noop", "limit": 100})).json()["tasks"]
        team_a = (await api.get("/api/v1/tasks", params={"label": "team=a", "limit": 100})).json()["tasks"]
        by_path = (await api.get("/api/v1/tasks/status/succeeded", params={"limit": 5})).json()
        metrics = (await api.get("/metrics")).text
        bad_status = await api.get("/api/v1/tasks", params={"status": "finished"})
        bad_cursor = await api.get("/api/v1/tasks", params={"cursor": "nonsense"})
    assert seen == [f"t-{i:02d}" for i in reversed(range(30))]  # newest submission first, each once
    assert sorted(task["id"] for task in noops) == [f"t-{i:02d}" for i in range(0, 30, 3)]
    assert sorted(task["id"] for task in team_a) == [f"t-{i:02d}" for i in range(10)]
    assert len(by_path["tasks"]) == 5 and by_path["next_cursor"]
    assert 'streamsched_tasks{status="succeeded"} 30.0' in metrics and "streamsched_workers 1.0" in metrics
    assert bad_status.status_code == 422 and bad_status.json()["field"] == "status"
    assert bad_cursor.status_code == 422 and bad_cursor.json()["field"] == "cursor"


@pytest.fixture
async def served(settings, bus) -> AsyncIterator[str]:
    async with serving_http(create_app(settings)) as base_url:
        yield base_url


async def test_the_event_feed_streams_every_event_of_a_task_in_order(settings, bus, examples, served):
    import httpx

    kinds: list[str] = []
    async with running(await all_roles(settings, bus, examples)), httpx.AsyncClient(base_url=served, timeout=15) as http:
        async with http.stream("GET", "/api/v1/events", params={"task": "sse-1"}) as feed:
            assert feed.status_code == 200 and feed.headers["content-type"].startswith("text/event-stream")
            await http.post("/api/v1/tasks", content=b'{"id": "sse-1", "type": "echo"}')
            await http.post("/api/v1/tasks", content=b'{"id": "other", "type": "echo"}')
            with anyio.fail_after(15):
                async for line in feed.aiter_lines():
                    if line.startswith("event:"):
                        kinds.append(line.split(":", 1)[1].strip())
                    if line.startswith("data:"):
                        assert msgspec.json.decode(line.split(":", 1)[1])["task_id"] == "sse-1"
                    if kinds[-1:] == ["succeeded"]:
                        break
        bad_kind = await http.get("/api/v1/events", params={"kind": "finished"})
    assert kinds == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    assert bad_kind.status_code == 422


async def test_a_token_when_set_is_required_everywhere_but_the_probes(settings, bus):
    guarded = msgspec.structs.replace(settings, api_token="s3cret")
    async with AsyncTestClient(app=create_app(guarded)) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/ready")).status_code == 200  # a Kubernetes probe carries no token
        denied = await http.get("/api/v1/tasks/x")
        wrong = await http.get("/api/v1/tasks/x", headers={"Authorization": "Bearer nope"})
        allowed = await http.get("/api/v1/tasks/x", headers={"Authorization": "Bearer s3cret"})
        posted = await http.post("/api/v1/tasks", content=b'{"type": "echo"}')
    assert denied.status_code == 401 and "bearer token" in denied.json()["error"]
    assert wrong.status_code == 401 and posted.status_code == 401
    assert allowed.status_code == 404  # through the guard: the task is unknown


async def test_ready_is_503_while_nats_is_down_and_200_once_it_is_back(tmp_path):
    import httpx

    from streamsched.config import Settings
    from streamsched.transport import streams
    from streamsched.transport.bus import Bus
    from streamsched.transport.server import NatsServer, free_port

    server = NatsServer(port=free_port(), store_dir=tmp_path / "js").start()
    settings = Settings.load({}, nats_url=server.url)
    setup = await Bus.connect(server.url, name="setup")
    await streams.apply(setup, settings)
    await setup.close()
    try:
        async with serving_http(create_app(settings)) as base_url, httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            assert (await http.get("/ready")).status_code == 200
            server.stop()
            with anyio.fail_after(10):
                while (down := await http.get("/ready")).status_code != 503:
                    await anyio.sleep(0.05)
            with anyio.fail_after(3):  # answered at once, not after a timeout
                lookup = await http.get("/api/v1/tasks/some-task")
            assert down.headers["retry-after"] == "1" and lookup.status_code == 503 and lookup.headers["retry-after"] == "1"
            assert (await http.get("/health")).status_code == 200
            server.start()
            with anyio.fail_after(20):
                while (await http.get("/ready")).status_code != 200:
                    await anyio.sleep(0.1)
            assert (await http.get("/api/v1/tasks/some-task")).status_code == 404
    finally:
        server.stop()


async def test_dead_tasks_are_listed_and_redriven(settings, bus, examples, api):
    async with running(await all_roles(settings, bus, examples)):
        assert (await api.post("/api/v1/tasks", content=b'{"id": "doomed", "type": "fail", "max_attempts": 1}')).status_code == 201
        await wait_status(api, "doomed", "dead")
        dead = (await api.get("/api/v1/dlq", params={"type": "fail"})).json()
        refused = await api.post("/api/v1/dlq/redrive", content=b"{}")
        report = (await api.post("/api/v1/dlq/redrive", content=b'{"type": "fail"}')).json()
        again = (await api.post("/api/v1/dlq/redrive", content=b'{"type": "fail"}')).json()
    assert [(entry["task_id"], entry["attempts"]) for entry in dead] == [("doomed", 1)]
    assert '"doomed"' in dead[0]["submission"] and dead[0]["error"]
    assert refused.status_code == 422 and refused.json()["field"] == "type"
    assert report["redriven"] == [f"doomed-r{dead[0]['seq']}"]
    assert not set(report["redriven"]) & set(again["redriven"])  # taken off DLQ when re-driven: never twice
