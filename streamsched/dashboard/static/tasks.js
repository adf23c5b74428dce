// The task table (filters, search by id, cursor paging, kept current by the live feed) and
// a task's page (its state, its events as a timeline, cancel and reprioritize).

import { get, post, withQuery, ApiError } from "./api.js";
import { h, fill, badge, confirmed, dateTime, duration, progressBar, refresher, time } from "./dom.js";
import { onFeed } from "./feed.js";

const STATUSES = ["pending", "waiting", "scheduled", "running", "retrying", "succeeded", "failed", "dead", "rejected", "cancelled"];
const PAGE = 50;
/** The label every task of a workflow carries (its workflow's id). */
export const WORKFLOW_LABEL = "streamsched/workflow";
/** Reload a view the feed changed at most this often. */
const REFRESH_MS = 1000;

export function renderTasks(root, query = "") {
  const given = new URLSearchParams(query);
  const filters = { status: given.get("status") || "", type: given.get("type") || "", region: given.get("region") || "", label: given.get("label") || "" };
  const cursors = [null]; // cursors[i] opens page i
  let pageIndex = 0;
  let nextCursor = null;

  const status = h("select", { name: "status" }, h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s }, s)));
  status.value = filters.status;
  const type = h("input", { name: "type", placeholder: "type", value: filters.type });
  const region = h("input", { name: "region", placeholder: "region", value: filters.region });
  const label = h("input", { name: "label", placeholder: "label name=value", value: filters.label });
  const search = h("input", { name: "id", placeholder: "task id", id: "search-id" });
  const rows = h("tbody");
  const info = h("span", { class: "page-info" });
  const previous = h("button", { type: "button", id: "prev-page", onclick: () => turn(-1) }, "‹ Newer");
  const next = h("button", { type: "button", id: "next-page", onclick: () => turn(1) }, "Older ›");
  const problem = h("p", { class: "error" });

  fill(
    root,
    h("h1", {}, "Tasks"),
    h(
      "form",
      { class: "filters", id: "filters", onsubmit: (e) => (e.preventDefault(), apply()) },
      status,
      type,
      region,
      label,
      h("button", { type: "submit" }, "Filter"),
    ),
    h(
      "form",
      { class: "filters", id: "search", onsubmit: (e) => (e.preventDefault(), search.value.trim() && (location.hash = `#/task/${encodeURIComponent(search.value.trim())}`)) },
      search,
      h("button", { type: "submit" }, "Open"),
    ),
    problem,
    h(
      "table",
      { id: "tasks" },
      h("thead", {}, h("tr", {}, ["id", "type", "status", "priority", "region", "submitted", "updated", "workflow"].map((c) => h("th", {}, c)))),
      rows,
    ),
    h("div", { class: "pager" }, previous, info, next),
  );
  status.addEventListener("change", apply);

  function apply() {
    filters.status = status.value;
    filters.type = type.value.trim();
    filters.region = region.value.trim();
    filters.label = label.value.trim();
    cursors.length = 1;
    pageIndex = 0;
    load();
  }

  function turn(step) {
    if (step > 0 && !nextCursor) return;
    if (step > 0) cursors[pageIndex + 1] = nextCursor;
    pageIndex = Math.max(0, pageIndex + step);
    load();
  }

  async function load() {
    try {
      const page = await get(withQuery("/api/v1/tasks", { ...filters, limit: PAGE, cursor: cursors[pageIndex] }));
      problem.textContent = "";
      nextCursor = page.next_cursor;
      fill(
        rows,
        page.tasks.map((t) =>
          h(
            "tr",
            { dataset: { taskId: t.id, status: t.status } },
            h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.id)}` }, t.id)),
            h("td", {}, t.type || "—"),
            h("td", {}, badge(t.status)),
            h("td", {}, t.priority || "—"),
            h("td", {}, t.region || "—"),
            h("td", {}, dateTime(t.submitted_at)),
            h("td", {}, time(t.updated_at)),
            h("td", {}, t.labels && t.labels[WORKFLOW_LABEL] ? h("a", { href: `#/workflow/${encodeURIComponent(t.labels[WORKFLOW_LABEL])}` }, t.labels[WORKFLOW_LABEL]) : ""),
          ),
        ),
      );
      if (!page.tasks.length) rows.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No task matches.")));
      info.textContent = `page ${pageIndex + 1}`;
      previous.disabled = pageIndex === 0;
      next.disabled = !nextCursor;
    } catch (error) {
      problem.textContent = error.message;
    }
  }

  load();
  // Any event may add a task to this page or change one on it: reload it (a page read is
  // a walk of the server's sorted list, cheap however many tasks there are).
  const stop = onFeed(refresher(load, REFRESH_MS));
  return stop;
}

/** The W3C trace id inside a `traceparent` (`00-<trace id>-<span id>-<flags>`). */
function traceId(traceparent) {
  const parts = (traceparent || "").split("-");
  return parts.length === 4 ? parts[1] : traceparent || "";
}

/** A time between events (events of different roles are stamped by different clocks: may be < 0). */
function delta(seconds) {
  return `${seconds < 0 ? "−" : "+"}${duration(Math.abs(seconds))}`;
}

function detailOf(event) {
  switch (event.kind) {
    case "submitted":
      return `type ${event.type}, priority ${event.priority}`;
    case "waiting":
      return [event.on && event.on.length ? `for ${event.on.join(", ")}` : "", event.until ? `until ${time(event.until)}` : ""].filter(Boolean).join(" ");
    case "scheduled":
    case "dispatched":
      return `priority ${event.priority}`;
    case "held":
      return `${event.reason} (priority ${event.priority})`;
    case "progress":
      return [event.fraction !== undefined && event.fraction !== null ? `${Math.round(event.fraction * 100)} %` : "", event.message || ""].filter(Boolean).join(" ");
    case "retrying":
      return `${event.error} — next attempt in ${duration(event.delay_s)}`;
    case "succeeded":
      return `ran ${duration(event.duration_s)}`;
    case "failed":
    case "dead":
      return event.error;
    case "rejected":
      return event.reason;
    case "cancelled":
      return event.reason || "";
    case "reprioritized":
      return `${event.previous || "?"} → ${event.priority}`;
    case "stranded":
    case "rerouted":
      return event.reason;
    default:
      return "";
  }
}

export function renderTask(root, taskId) {
  const head = h("div", { class: "task-head" });
  const actions = h("div", { class: "actions" });
  const timeline = h("tbody");
  const problem = h("p", { class: "error" });
  fill(
    root,
    h("h1", {}, "Task ", h("code", { id: "task-id" }, taskId)),
    problem,
    head,
    actions,
    h("h2", {}, "Timeline"),
    h(
      "table",
      { id: "timeline" },
      h("thead", {}, h("tr", {}, ["event", "time", "+ since previous", "+ since first", "attempt", "region", "worker", "detail"].map((c) => h("th", {}, c)))),
      timeline,
    ),
  );
  let priorities = [];

  async function load() {
    let state;
    let events = [];
    try {
      state = await get(`/api/v1/tasks/${encodeURIComponent(taskId)}`);
    } catch (error) {
      problem.textContent = error instanceof ApiError && error.status === 404 ? `No task ${taskId} (yet).` : error.message;
      return;
    }
    try {
      events = await get(`/api/v1/tasks/${encodeURIComponent(taskId)}/events`);
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) problem.textContent = error.message;
    }
    problem.textContent = "";
    const trace = events.map((e) => e.trace).find(Boolean);
    const workflow = state.labels && state.labels[WORKFLOW_LABEL];
    const field = (name, ...value) => [h("dt", {}, name), h("dd", {}, ...value)];
    fill(
      head,
      h(
        "dl",
        {},
        field("status", h("span", { id: "task-status", dataset: { status: state.status } }, badge(state.status))),
        field("type", state.type || "—"),
        field("priority", state.priority || "—"),
        field("region", state.region || "—"),
        field("attempts", String(state.attempts || 0)),
        field("progress", state.progress !== undefined ? progressBar(state.progress) : "—", state.progress_message ? ` ${state.progress_message}` : ""),
        field("worker", state.worker || "—"),
        field("trace id", h("code", { id: "trace-id" }, traceId(trace) || "—")),
        field("submitted", dateTime(state.submitted_at)),
        field("finished", dateTime(state.finished_at)),
        workflow ? field("workflow", h("a", { href: `#/workflow/${encodeURIComponent(workflow)}` }, workflow)) : [],
        state.error ? field("error", h("pre", {}, state.error)) : [],
        state.waiting_reason ? field("waiting", state.waiting_reason) : [],
        state.stranded ? field("stranded", state.stranded) : [],
        state.labels && Object.keys(state.labels).length ? field("labels", Object.entries(state.labels).map(([k, v]) => `${k}=${v}`).join(", ")) : [],
        state.result !== undefined ? field("result", h("pre", {}, JSON.stringify(state.result, null, 2))) : [],
      ),
    );
    drawActions(state);
    const first = events.length ? events[0].at : 0;
    fill(
      timeline,
      events.map((event, i) =>
        h(
          "tr",
          { class: `kind-${event.kind}`, dataset: { kind: event.kind } },
          h("td", {}, badge(event.kind)),
          h("td", {}, time(event.at)),
          h("td", { class: "num" }, i ? delta(event.at - events[i - 1].at) : ""),
          h("td", { class: "num" }, i ? delta(event.at - first) : ""),
          h("td", { class: "num" }, event.attempt || ""),
          h("td", {}, event.region || ""),
          h("td", {}, event.worker || ""),
          h("td", { class: "detail" }, detailOf(event)),
        ),
      ),
    );
  }

  function drawActions(state) {
    const finished = ["succeeded", "failed", "dead", "rejected", "cancelled"].includes(state.status);
    const choice = h("select", { id: "new-priority" }, priorities.map((p) => h("option", { value: p }, p)));
    if (state.priority) choice.value = state.priority;
    fill(
      actions,
      h(
        "button",
        {
          type: "button",
          id: "cancel-task",
          class: "danger",
          disabled: finished,
          onclick: () =>
            confirmed(`Cancel task ${taskId}?`, () => post(`/api/v1/tasks/${encodeURIComponent(taskId)}/cancel`, { reason: "cancelled from the dashboard" }), () => `Asked to cancel ${taskId}.`).then(
              load,
            ),
        },
        "Cancel…",
      ),
      " ",
      choice,
      h(
        "button",
        {
          type: "button",
          id: "reprioritize-task",
          disabled: finished || !priorities.length,
          onclick: () =>
            confirmed(
              `Move task ${taskId} to priority ${choice.value}?`,
              () => post(`/api/v1/tasks/${encodeURIComponent(taskId)}/priority`, { priority: choice.value }),
              () => `Asked to move ${taskId} to ${choice.value}.`,
            ).then(load),
        },
        "Reprioritize…",
      ),
    );
  }

  get("/api/v1/cluster/info")
    .then((info) => (priorities = info.priorities))
    .catch(() => {})
    .finally(load);
  const reload = refresher(load, REFRESH_MS / 2);
  return onFeed((kind, event) => {
    if (event.task_id === taskId) reload();
  });
}
