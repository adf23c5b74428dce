// A workflow's page: its DAG laid out by dagre and drawn as SVG, each node coloured by its
// task's status with its progress; kept current by the live feed.

import dagre from "./vendor/dagre/dagre.esm.js";
import { get, withQuery } from "./api.js";
import { h, s, fill, badge, refresher } from "./dom.js";
import { onFeed } from "./feed.js";
import { WORKFLOW_LABEL } from "./tasks.js";

const NODE_W = 170;
const NODE_H = 54;

export function renderWorkflow(root, workflowId) {
  const input = h("input", { name: "workflow", placeholder: "workflow id", value: workflowId || "", id: "workflow-id" });
  const summary = h("div", { class: "workflow-head" });
  const canvas = h("div", { class: "dag", id: "dag" });
  const problem = h("p", { class: "error" });
  const recent = h("ul", { class: "recent" });
  fill(
    root,
    h("h1", {}, "Workflow", workflowId ? " " : "", workflowId ? h("code", {}, workflowId) : ""),
    h("form", { class: "filters", onsubmit: (e) => (e.preventDefault(), input.value.trim() && (location.hash = `#/workflow/${encodeURIComponent(input.value.trim())}`)) }, input, h("button", { type: "submit" }, "Open")),
    problem,
    summary,
    canvas,
    workflowId ? "" : [h("h2", {}, "Recent workflows"), recent],
  );
  if (!workflowId) {
    listRecent(recent);
    return null;
  }

  async function load() {
    let graph;
    try {
      graph = await get(`/api/v1/workflows/${encodeURIComponent(workflowId)}/graph`);
    } catch (error) {
      problem.textContent = error.message;
      return;
    }
    problem.textContent = "";
    const counts = {};
    for (const node of graph.nodes) counts[node.status] = (counts[node.status] || 0) + 1;
    fill(
      summary,
      h("span", { id: "workflow-status", dataset: { status: graph.status } }, badge(graph.status)),
      " ",
      Object.entries(counts).map(([status, n]) => h("span", { class: "tally" }, `${n} ${status}`)),
      graph.truncated ? h("p", { class: "note" }, `Only the first ${graph.nodes.length} tasks are drawn.`) : "",
    );
    fill(canvas, draw(graph, workflowId));
  }

  load();
  const reload = refresher(load, 500);
  const prefix = `${workflowId}-`;
  return onFeed((kind, event) => {
    if (event.task_id === workflowId || (event.task_id && event.task_id.startsWith(prefix))) reload();
  });
}

function draw(graph, workflowId) {
  const layout = new dagre.graphlib.Graph();
  layout.setGraph({ rankdir: "LR", nodesep: 24, ranksep: 60, marginx: 10, marginy: 10 });
  layout.setDefaultEdgeLabel(() => ({}));
  for (const node of graph.nodes) layout.setNode(node.id, { width: NODE_W, height: NODE_H });
  for (const [from, to] of graph.edges) layout.setEdge(from, to);
  dagre.layout(layout);
  const { width, height } = layout.graph();
  const svg = s("svg", { width: Math.max(width, 100), height: Math.max(height, 60), viewBox: `0 0 ${Math.max(width, 100)} ${Math.max(height, 60)}`, role: "img" });
  svg.append(
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" }, s("path", { d: "M0,0 L10,5 L0,10 z" }))),
  );
  for (const edge of layout.edges()) {
    const points = layout.edge(edge).points;
    svg.append(s("polyline", { class: "edge", points: points.map((p) => `${p.x},${p.y}`).join(" "), "marker-end": "url(#arrow)" }));
  }
  const local = (id) => (id.startsWith(`${workflowId}-`) ? id.slice(workflowId.length + 1) : id);
  for (const node of graph.nodes) {
    const place = layout.node(node.id);
    const x = place.x - NODE_W / 2;
    const y = place.y - NODE_H / 2;
    const group = s(
      "a",
      { href: `#/task/${encodeURIComponent(node.id)}`, class: `node status-${node.status}`, "data-task-id": node.id, "data-status": node.status },
      s("title", {}, `${node.id}: ${node.status}${node.type ? ` (${node.type})` : ""}`),
      s("rect", { x, y, width: NODE_W, height: NODE_H, rx: 6 }),
      s("text", { x: x + 8, y: y + 20, class: "name" }, local(node.id)),
      s("text", { x: x + 8, y: y + 38, class: "state" }, [node.status, node.type || "", node.attempts > 1 ? `×${node.attempts}` : ""].filter(Boolean).join(" · ")),
    );
    if (node.progress !== undefined && node.progress !== null) {
      const fraction = Math.max(0, Math.min(1, node.progress));
      group.append(s("rect", { x: x + 8, y: y + NODE_H - 9, width: NODE_W - 16, height: 4, class: "bar" }));
      group.append(s("rect", { x: x + 8, y: y + NODE_H - 9, width: (NODE_W - 16) * fraction, height: 4, class: "bar-done" }));
    }
    svg.append(group);
  }
  return svg;
}

/** Workflows of the newest tasks (their label names them), for a start without an id. */
async function listRecent(list) {
  try {
    const page = await get(withQuery("/api/v1/tasks", { limit: 500 }));
    const seen = [...new Set(page.tasks.map((t) => t.labels && t.labels[WORKFLOW_LABEL]).filter(Boolean))].slice(0, 20);
    fill(list, seen.map((id) => h("li", {}, h("a", { href: `#/workflow/${encodeURIComponent(id)}` }, id))));
    if (!seen.length) list.append(h("li", { class: "empty" }, "None among the newest 500 tasks."));
  } catch (error) {
    fill(list, h("li", { class: "error" }, error.message));
  }
}
