// The dashboard: hash routes (#/, #/tasks, #/task/<id>, #/workflow/<id>, #/dlq), one live
// feed of events shared by the pages, and the series the overview charts, sampled while
// the page is open whichever view is shown.

import { h, fill } from "./dom.js";
import { onFeed, startFeed } from "./feed.js";
import { Series, renderOverview } from "./overview.js";
import { renderTasks, renderTask } from "./tasks.js";
import { renderWorkflow } from "./workflow.js";
import { renderDeadLetters } from "./dlq.js";

const series = new Series();
onFeed((kind, event) => series.onEvent(kind, event));
startFeed((state) => {
  const node = document.getElementById("feed-state");
  node.textContent = state === "live" ? "● live" : "○ offline";
  node.className = `feed ${state}`;
  document.body.dataset.feed = state;
});
series.start();

const routes = [
  [/^#?\/?$/, "overview", () => (root) => renderOverview(root, series)],
  [/^#\/tasks\/?(?:\?(.*))?$/, "tasks", (query) => (root) => renderTasks(root, query || "")],
  [/^#\/task\/(.+)$/, "tasks", (id) => (root) => renderTask(root, id)],
  [/^#\/workflow\/?$/, "workflow", () => (root) => renderWorkflow(root, null)],
  [/^#\/workflow\/(.+)$/, "workflow", (id) => (root) => renderWorkflow(root, id)],
  [/^#\/dlq\/?$/, "dlq", () => renderDeadLetters],
];

let cleanup = null;

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  const view = document.getElementById("view");
  const hash = location.hash || "#/";
  for (const [pattern, nav, page] of routes) {
    const match = hash.match(pattern);
    if (!match) continue;
    for (const link of document.querySelectorAll("[data-nav]")) link.classList.toggle("active", link.dataset.nav === nav);
    const args = match.slice(1).map((part) => (part === undefined ? undefined : decodeURIComponent(part)));
    fill(view);
    cleanup = page(...args)(view) || null;
    return;
  }
  fill(view, h("p", {}, "No such page. "), h("a", { href: "#/" }, "Back to the overview"));
}

window.addEventListener("hashchange", route);
route();
