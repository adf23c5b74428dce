"""The web dashboard the API serves at ``/``: one page (``static/index.html``) and its ES
modules and vendored libraries under ``/ui/static/``, with no build step, plus the few
aggregates it reads that the rest of the API lacks.

The page holds no data of its own: it reads the API's endpoints and the SSE feed like any
client, so it needs no token to be served (``opt={"no_token": True}``); with
``api_token`` set the page asks for the token once and sends it on each API call.

What is aggregated here rather than in the page (which must stay quick with 100,000 tasks):
task counts by status (the API's task list keeps them), queue depth by stage, region and
priority (the durables' counts, :mod:`streamsched.queues`: a few requests, however many
tasks wait), and a workflow's graph (its tasks' states, at most :data:`MAX_GRAPH_NODES`).
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, FromQuery
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

from .. import subjects
from ..client import Client
from ..errors import NotFound
from ..eventlog import dlq
from ..queues import QueueDepth, queue_depths
from ..roles.breakers import Breaker
from ..task_index import Filter, TaskIndex

#: Where the page's files are (inside the installed package: pip ships them in the wheel).
STATIC = Path(str(resources.files(__name__) / "static"))
#: Most tasks of a workflow drawn as a graph (each is one KV read; a larger one is cut, and says so).
MAX_GRAPH_NODES = 500
#: Most ids one ``/api/v1/statuses`` request answers.
MAX_STATUSES = 1000
#: Route options that let a request through without the API token (the page and its files hold no data).
OPEN = {"no_token": True}


def _client(request: Request[Any, Any, Any]) -> Client:
    client: Client = request.app.state.client
    return client


@get("/", include_in_schema=False, opt=OPEN, media_type="text/html")
async def index_page() -> Response[bytes]:
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html", headers={"Cache-Control": "no-cache"})


class Queues(msgspec.Struct, frozen=True):
    at: float
    queues: list[QueueDepth]


@get("/api/v1/cluster/queues", summary="Tasks waiting by stage, region, priority and type (from JetStream's counts)")
async def queues(request: Request[Any, Any, Any]) -> Queues:
    """The stages of :mod:`streamsched.queues` (what ``queue_size`` in ``/metrics`` sums), those
    that hold tasks."""
    client = _client(request)
    return Queues(time.time(), [depth for depth in await queue_depths(client.bus, client.settings) if depth.tasks])


@get("/api/v1/cluster/counts", summary="Tasks by status in the API's task list (what GET /api/v1/tasks pages through)")
async def counts(request: Request[Any, Any, Any]) -> dict[str, int]:
    index: TaskIndex = request.app.state.index
    await index.loaded_page(Filter(), limit=1)  # waits for the list to load, or says it is loading
    return index.counts()


@get("/api/v1/breakers", summary="The circuit breakers, by region and task type")
async def breakers(request: Request[Any, Any, Any]) -> list[Breaker]:
    return await _client(request).breakers()


@get("/api/v1/statuses", summary="The status of each task named (null for one the task list does not hold)")
async def statuses(request: Request[Any, Any, Any], id: FromQuery[list[str]]) -> dict[str, str | None]:
    """Read from the API's task list (memory, no KV read): what a page showing many ids asks."""
    index: TaskIndex = request.app.state.index
    found = {}
    for task_id in id[:MAX_STATUSES]:
        entry = index.entries.get(task_id)
        found[task_id] = entry.status.value if entry is not None else None
    return found


class GraphNode(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    status: str
    type: str | None = None
    progress: float | None = None
    attempts: int = 0


class WorkflowGraph(msgspec.Struct, frozen=True):
    """A workflow's tasks and the edges ``[dependency, dependant]`` between them."""

    id: str
    status: str
    nodes: list[GraphNode]
    edges: list[tuple[str, str]]
    truncated: bool


@get("/api/v1/workflows/{workflow_id:str}/graph", summary="A workflow's tasks with their states, and their dependencies")
async def workflow_graph(request: Request[Any, Any, Any], workflow_id: FromPath[str]) -> WorkflowGraph:
    client = _client(request)
    flow = await client.get_workflow(workflow_id)
    if flow is None:
        raise NotFound(f"no workflow {workflow_id}")
    ids = sorted(flow.tasks)[:MAX_GRAPH_NODES]
    states = await asyncio.gather(*(client.get(task_id) for task_id in ids))
    nodes, edges = [], []
    drawn = set(ids)
    for task_id, state in zip(ids, states, strict=True):
        if state is None:  # listed by the workflow, its state not written yet
            nodes.append(GraphNode(task_id, flow.tasks[task_id]))
            continue
        nodes.append(GraphNode(task_id, state.status.value, state.type, state.progress, state.attempts))
        # A dependant keeps the ``waiting_on`` its wait began with: every dependency it named.
        edges += [(dependency, task_id) for dependency in state.waiting_on if dependency in drawn]
    return WorkflowGraph(flow.id, flow.status, nodes, edges, truncated=len(flow.tasks) > len(ids))


class Redriven(msgspec.Struct, frozen=True):
    task_id: str
    redrive_id: str
    redriven: bool
    """False when it had been re-driven already (the new task exists)."""


@post("/api/v1/dlq/{task_id:str}/redrive", status_code=200, summary="Submit one dead task again as a new task (id <id>-r<seq>); safe to repeat")
async def redrive_one(request: Request[Any, Any, Any], task_id: FromPath[str]) -> Redriven:
    client = _client(request)
    entry = await dlq.show(client.bus, task_id) if subjects.is_token(task_id) else None
    if entry is None:
        raise NotFound(f"no dead task {task_id}")
    report = await dlq.redrive(client.bus, [entry], retry_budget_s=client.settings.submit_retry_budget_s)
    if report.unreadable:
        raise NotFound(f"dead task {task_id}: its stored submission cannot be read")
    return Redriven(task_id, entry.redrive_id, redriven=bool(report.redriven))


#: What :func:`streamsched.rest.create_app` registers.
ROUTES: list[ControllerRouterHandler] = [
    index_page,
    create_static_files_router(path="/ui/static", directories=[STATIC], opt=OPEN, name="dashboard"),
    queues,
    counts,
    statuses,
    breakers,
    workflow_graph,
    redrive_one,
]
