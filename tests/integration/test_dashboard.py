"""The web dashboard at ``/``, in a real headless Chromium driven by Playwright, against the
API under uvicorn, a real nats-server and the roles in this process: the page loads with no
console error and shows the API's counts, a submitted task appears live and its timeline
opens, a workflow's DAG is drawn with its nodes' states, a dead task is re-driven by a click,
and a waiting task is cancelled by its button. Screenshots go to ``test-artifacts/``.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it); no browser is downloaded. Without
it these tests skip, except under CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from streamsched import current_task, task
from streamsched.dashboard import STATIC
from streamsched.rest import create_app
from streamsched.testing import all_roles, running, serving_http

from .test_rest import wait_status

pytestmark = pytest.mark.anyio

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
#: Chromium on a machine with no network: without the background-networking flags it tries
#: (and logs failing) connections of its own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Longest a page waits for something to show (the feed, a status change).
SHOW_MS = 15_000

#: Cleared by the re-drive test to mend the handler that kills its tasks.
broken = threading.Event()
broken.set()
#: Set to let the progress handler return.
release = threading.Event()


@task("test.dashboard.mended")
def mended(payload: Any) -> str:
    """Fails while :data:`broken` is set (a task with one attempt dies), succeeds after."""
    if broken.is_set():
        raise RuntimeError("broken for now")
    return "mended"


@task("test.dashboard.progress")
def halfway(payload: Any) -> str:
    current_task().progress(0.5, "halfway")
    release.wait(10)
    return "done"


def _browser_or_skip() -> str:
    if CHROMIUM is not None:
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A Chromium page; the console errors and page errors it logs are in ``page.problems``.
    Its screenshot is saved as ``test-artifacts/<test name>.png`` at the end."""
    executable = _browser_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            tab = await browser.new_page(viewport={"width": 1400, "height": 1000})
            tab.set_default_timeout(SHOW_MS)
            problems: list[str] = []
            tab.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
            tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            # Every confirm() the page asks is accepted; a prompt() (for the API token) is answered "secret".
            tab.on("dialog", lambda dialog: dialog.accept("secret") if dialog.type == "prompt" else dialog.accept())
            tab.problems = problems
            yield tab
            ARTIFACTS.mkdir(exist_ok=True)
            await tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        finally:
            await browser.close()


@pytest.fixture
async def api(settings, bus, registry) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """The API under uvicorn with every role running; its base URL and an HTTP client of it."""
    async with (
        running(await all_roles(settings, bus, registry)),
        serving_http(create_app(settings, nats_service=False)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield base_url, http


@pytest.fixture
async def guarded_api(settings, bus) -> AsyncIterator[str]:
    """The API under uvicorn with the token ``secret``, no role running; its base URL. (Set up
    before the page, so the browser closes its live feed before the server stops.)"""
    async with serving_http(create_app(msgspec.structs.replace(settings, api_token="secret"), nats_service=False)) as base_url:
        yield base_url


async def submit(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    answer = await http.post("/api/v1/tasks", content=msgspec.json.encode(body))
    assert answer.status_code == 201, answer.text
    ids: list[str] = answer.json()["ids"]
    return ids[0]


async def listed_counts(http: httpx.AsyncClient) -> dict[str, int]:
    """Tasks by status as GET /api/v1/tasks pages them."""
    counts: dict[str, int] = {}
    cursor = None
    while True:
        page = (await http.get("/api/v1/tasks", params={"limit": 1000, **({"cursor": cursor} if cursor else {})})).json()
        for entry in page["tasks"]:
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        if (cursor := page["next_cursor"]) is None:
            return counts


def test_the_page_and_its_files_ship_inside_the_package():
    static = resources.files("streamsched.dashboard") / "static"
    shipped = ["index.html", "app.js", "style.css", "vendor/uplot/uPlot.esm.js", "vendor/uplot/LICENSE", "vendor/dagre/dagre.esm.js"]
    for name in [*shipped, "vendor/dagre/LICENSE"]:
        assert (static / name).is_file(), name
    assert Path(str(static)) == STATIC


async def test_the_page_and_its_files_are_served_without_the_token_and_the_api_still_wants_it(guarded_api):
    async with httpx.AsyncClient(base_url=guarded_api, timeout=10) as http:
        page = await http.get("/")
        script = await http.get("/ui/static/app.js")
        refused = await http.get("/api/v1/cluster/counts")
        allowed = await http.get("/api/v1/cluster/counts", headers={"Authorization": "Bearer secret"})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/ui/static/app.js" in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert refused.status_code == 401 and allowed.status_code == 200


@pytest.mark.browser
async def test_the_overview_loads_without_errors_and_shows_the_apis_counts(api, page):
    base_url, http = api
    done = [await submit(http, {"type": "echo", "payload": i}) for i in range(5)]
    failed = await submit(http, {"type": "fail_permanent"})
    waiting = await submit(http, {"type": "echo", "delay_s": 60})
    for task_id in done:
        await wait_status(http, task_id, "succeeded")
    await wait_status(http, failed, "failed")
    await wait_status(http, waiting, "waiting")
    expected = await listed_counts(http)
    assert expected == {"succeeded": 5, "failed": 1, "waiting": 1}

    await page.goto(base_url + "/")
    await page.wait_for_selector("body[data-feed=live]")
    for status in ("succeeded", "failed", "waiting", "running", "dead"):
        shown = "([status, n]) => document.querySelector(`#counts [data-status=${status}] .n`)?.textContent === String(n)"
        await page.wait_for_function(shown, arg=[status, expected.get(status, 0)])
    assert await page.text_content("#counts [data-status=total] .n") == "7"
    assert await page.locator("#workers tbody tr[data-worker]").count() == 1
    assert await page.locator("#chart-depth .uplot").count() == 1 and await page.locator("#chart-throughput .uplot").count() == 1
    assert page.problems == []


@pytest.mark.browser
async def test_with_a_token_the_page_asks_for_it_once_and_shows_the_counts(guarded_api, page):
    prompts: list[str] = []
    page.on("dialog", lambda dialog: prompts.append(dialog.message) if dialog.type == "prompt" else None)
    await page.goto(guarded_api + "/")
    await page.wait_for_selector("#counts [data-status=total]")
    await page.wait_for_selector("body[data-feed=live]")  # the feed sends the token too
    assert await page.text_content("#counts [data-status=total] .n") == "0"
    assert len(prompts) == 1 and "token" in prompts[0]
    assert [problem for problem in page.problems if "401" not in problem] == []  # the refused requests before the prompt


@pytest.mark.browser
async def test_a_submitted_task_appears_live_and_its_timeline_opens(api, page):
    base_url, http = api
    await page.goto(base_url + "/#/tasks")
    await page.wait_for_selector("body[data-feed=live]")
    await page.wait_for_selector("#tasks tbody td.empty")
    task_id = await submit(http, {"type": "test.dashboard.progress", "labels": {"team": "<b>web</b>"}})
    row = page.locator(f'#tasks tbody tr[data-task-id="{task_id}"]')
    await row.wait_for()  # no reload: the feed brought it
    await page.wait_for_selector(f'#tasks tbody tr[data-task-id="{task_id}"][data-status=running]')
    release.set()
    try:
        await page.wait_for_selector(f'#tasks tbody tr[data-task-id="{task_id}"][data-status=succeeded]')
    finally:
        release.clear()
    await row.locator("a").first.click()
    await page.wait_for_selector("#task-status[data-status=succeeded]")
    await page.wait_for_selector("#timeline tr[data-kind=succeeded]")
    kinds = await page.locator("#timeline tbody tr").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    assert kinds[:2] == ["submitted", "scheduled"] and "started" in kinds and "progress" in kinds and kinds[-1] == "succeeded"
    assert "halfway" in (await page.text_content("#timeline tr[data-kind=progress]") or "")
    assert await page.text_content("#trace-id")  # the trace id, or "—" with tracing off
    assert "<b>web</b>" in (await page.text_content(".task-head") or "")  # user data shown as text, not markup
    assert page.problems == []


@pytest.mark.browser
async def test_a_workflows_dag_is_drawn_with_each_nodes_state(api, page):
    base_url, http = api
    workflow = {
        "id": "wf-dash",
        "tasks": [
            {"id": "a", "type": "echo"},
            {"id": "b", "type": "echo", "depends_on": ["a"]},
            {"id": "c", "type": "fail_permanent", "depends_on": ["a"]},
            {"id": "d", "type": "echo", "depends_on": ["b", "c"]},
        ],
    }
    await submit(http, {"workflow": workflow})
    with anyio.fail_after(15):
        while (await http.get("/api/v1/workflows/wf-dash")).json().get("finished_at") is None:
            await anyio.sleep(0.05)
    graph = (await http.get("/api/v1/workflows/wf-dash/graph")).json()
    await page.goto(base_url + "/#/workflow/wf-dash")
    await page.wait_for_selector("#dag svg a.node")
    states = await page.locator("#dag svg a.node").evaluate_all("nodes => Object.fromEntries(nodes.map(n => [n.dataset.taskId, n.dataset.status]))")
    assert states == {node["id"]: node["status"] for node in graph["nodes"]}
    assert states["wf-dash-a"] == "succeeded" and states["wf-dash-c"] == "failed" and states["wf-dash-d"] in ("cancelled", "failed")
    assert sorted(map(tuple, graph["edges"])) == [
        ("wf-dash-a", "wf-dash-b"),
        ("wf-dash-a", "wf-dash-c"),
        ("wf-dash-b", "wf-dash-d"),
        ("wf-dash-c", "wf-dash-d"),
    ]
    assert await page.locator("#dag svg polyline.edge").count() == 4
    assert await page.locator("#dag svg a.node.status-succeeded").count() == 2
    assert page.problems == []


@pytest.mark.browser
async def test_a_dead_task_is_redriven_by_a_click(api, page):
    base_url, http = api
    broken.set()
    task_id = await submit(http, {"type": "test.dashboard.mended", "max_attempts": 1})
    await wait_status(http, task_id, "dead")
    await page.goto(base_url + "/#/dlq")
    row = page.locator(f'#dlq tbody tr[data-task-id="{task_id}"]')
    await row.wait_for()
    assert "broken for now" in (await row.text_content() or "")
    redrive_id = str(await row.get_attribute("data-redrive-id"))
    broken.clear()
    try:
        await row.locator("button.redrive").click()  # the page's confirm() is accepted
        await page.wait_for_selector(f'#redriven tr[data-task-id="{redrive_id}"][data-status=succeeded]')
        await row.wait_for(state="detached")  # out of the queue
    finally:
        broken.set()
    state = (await http.get(f"/api/v1/tasks/{redrive_id}")).json()
    assert state["status"] == "succeeded" and state["labels"]["redrive_of"] == task_id
    assert task_id not in [entry["task_id"] for entry in (await http.get("/api/v1/dlq")).json()]
    assert page.problems == []


@pytest.mark.browser
async def test_a_waiting_task_is_cancelled_by_its_button(api, page):
    base_url, http = api
    task_id = await submit(http, {"type": "echo", "delay_s": 60})
    await wait_status(http, task_id, "waiting")
    await page.goto(f"{base_url}/#/task/{task_id}")
    await page.wait_for_selector("#task-status[data-status=waiting]")
    await page.click("#cancel-task")  # the page's confirm() is accepted
    await wait_status(http, task_id, "cancelled")
    await page.wait_for_selector("#task-status[data-status=cancelled]")
    await page.wait_for_selector("#timeline tr[data-kind=cancelled]")
    assert await page.locator("#cancel-task").is_disabled()
    assert page.problems == []
