// The dead-letter queue: dead tasks with their last error, each re-driven by a button (a
// new task `<id>-r<seq>`, safe to repeat; the entry leaves the queue), or all of them at
// once. The tasks re-driven from this tab are listed above, with their status.

import { get, post, withQuery } from "./api.js";
import { h, fill, badge, confirmed, dateTime, refresher } from "./dom.js";
import { onFeed } from "./feed.js";

const LIMIT = 200;
/** Ids of the tasks re-driven from this tab, newest first (at most KEPT). */
const redriven = [];
const KEPT = 50;

function remember(ids) {
  redriven.unshift(...ids.filter((id) => !redriven.includes(id)));
  redriven.length = Math.min(redriven.length, KEPT);
}

export function renderDeadLetters(root) {
  const type = h("input", { name: "type", placeholder: "task type" });
  const rows = h("tbody");
  const problem = h("p", { class: "error" });
  const note = h("p", { class: "note" });
  const again = h("tbody");
  const againBox = h("div", { hidden: true }, h("h2", {}, "Re-driven from here"), h("table", { id: "redriven" }, again));
  fill(
    root,
    h("h1", {}, "Dead letters"),
    h(
      "form",
      { class: "filters", onsubmit: (e) => (e.preventDefault(), load()) },
      type,
      h("button", { type: "submit" }, "Filter"),
      h(
        "button",
        {
          type: "button",
          id: "redrive-all",
          class: "danger",
          onclick: () => {
            const only = type.value.trim();
            const body = only ? { type: only } : { all: true };
            confirmed(
              only ? `Re-drive every dead task of type ${only}?` : "Re-drive every dead task?",
              () => post("/api/v1/dlq/redrive", body),
              (report) => (remember(report.redriven), `Re-driven: ${report.redriven.length} (already: ${report.already_redriven.length}).`),
            ).then(load);
          },
        },
        "Re-drive all…",
      ),
    ),
    problem,
    againBox,
    h("h2", {}, "Dead tasks"),
    note,
    h(
      "table",
      { id: "dlq" },
      h("thead", {}, h("tr", {}, ["task", "type", "attempts", "error", "dead at", ""].map((c) => h("th", {}, c)))),
      rows,
    ),
  );

  async function load() {
    let entries;
    let statuses = {};
    try {
      entries = await get(withQuery("/api/v1/dlq", { type: type.value.trim(), limit: LIMIT }));
      if (redriven.length) statuses = await get(withQuery("/api/v1/statuses", { id: redriven }));
      problem.textContent = "";
    } catch (error) {
      problem.textContent = error.message;
      return;
    }
    note.textContent = entries.length === LIMIT ? `The oldest ${LIMIT} dead tasks are shown.` : "";
    fill(
      rows,
      entries.map((entry) =>
        h(
          "tr",
          { dataset: { taskId: entry.task_id, redriveId: entry.redrive_id } },
          h("td", {}, h("a", { href: `#/task/${encodeURIComponent(entry.task_id)}` }, entry.task_id)),
          h("td", {}, entry.type),
          h("td", { class: "num" }, entry.attempts),
          h("td", { class: "detail" }, entry.error),
          h("td", {}, dateTime(entry.stored_at)),
          h(
            "td",
            {},
            h(
              "button",
              {
                type: "button",
                class: "redrive",
                onclick: () =>
                  confirmed(
                    `Re-drive dead task ${entry.task_id} (as a new task ${entry.redrive_id})?`,
                    () => post(`/api/v1/dlq/${encodeURIComponent(entry.task_id)}/redrive`),
                    (answer) => (remember([answer.redrive_id]), answer.redriven ? `Re-driven as ${answer.redrive_id}.` : `Already re-driven as ${answer.redrive_id}.`),
                  ).then(load),
              },
              "Re-drive…",
            ),
          ),
        ),
      ),
    );
    againBox.hidden = !redriven.length;
    fill(
      again,
      redriven.map((id) =>
        h(
          "tr",
          { dataset: { taskId: id, status: statuses[id] || "" } },
          h("td", {}, h("a", { href: `#/task/${encodeURIComponent(id)}` }, id)),
          h("td", {}, statuses[id] ? badge(statuses[id]) : "not listed yet"),
        ),
      ),
    );
    if (!entries.length) rows.append(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No dead task.")));
  }

  load();
  const reload = refresher(load, 1000);
  // A new dead task, or a re-driven one moving on, changes this page.
  return onFeed((kind) => {
    if (kind === "dead" || kind === "submitted" || kind === "succeeded" || kind === "failed") reload();
  });
}
