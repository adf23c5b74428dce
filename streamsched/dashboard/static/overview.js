// The overview: tasks by status, queue depth over time, throughput and latency, workers and
// breakers. Counts, queues, workers and breakers are the server's aggregates, sampled every
// SAMPLE_MS; throughput and latency are counted from the live feed (succeeded, failed, dead
// and retrying events per second; the run time, `duration_s`, of each succeeded attempt).
// Every series keeps the last WINDOW_S seconds only.

import uPlot from "./vendor/uplot/uPlot.esm.js";
import { get } from "./api.js";
import { h, fill, badge, duration, time } from "./dom.js";

const SAMPLE_MS = 2000;
const WINDOW_S = 600;
const STATUSES = ["pending", "waiting", "scheduled", "running", "retrying", "succeeded", "failed", "dead", "rejected", "cancelled"];
const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c"];

/** The overview's data, kept while the page is open (whichever view is shown). */
export class Series {
  constructor() {
    this.counts = null;
    this.queues = [];
    this.workers = [];
    this.breakers = [];
    this.depth = []; // [{t, byKey: Map}]
    this.outcomes = new Map(); // second -> {succeeded, failed, retrying}
    this.runTimes = new Map(); // second bucket (SAMPLE_MS) -> [duration_s]
    this.error = null;
    this.onSample = null;
  }

  start() {
    const tick = async () => {
      await this.sample();
      setTimeout(tick, SAMPLE_MS);
    };
    tick();
  }

  async sample() {
    try {
      const [counts, queues, workers, breakers] = await Promise.all([
        get("/api/v1/cluster/counts"),
        get("/api/v1/cluster/queues"),
        get("/api/v1/workers"),
        get("/api/v1/breakers"),
      ]);
      this.counts = counts;
      this.queues = queues.queues;
      this.workers = workers;
      this.breakers = breakers;
      const byKey = new Map();
      for (const q of queues.queues) {
        const key = `${q.stage} ${q.region || "*"} ${q.priority}`;
        byKey.set(key, (byKey.get(key) || 0) + q.tasks);
      }
      this.depth.push({ t: queues.at, byKey });
      while (this.depth.length && this.depth[0].t < queues.at - WINDOW_S) this.depth.shift();
      this.error = null;
    } catch (error) {
      this.error = error.message;
    }
    const cutoff = Date.now() / 1000 - WINDOW_S;
    for (const table of [this.outcomes, this.runTimes]) {
      for (const second of table.keys()) if (second < cutoff) table.delete(second);
    }
    if (this.onSample) this.onSample();
  }

  onEvent(kind, event) {
    const outcome = { succeeded: "succeeded", failed: "failed", dead: "failed", retrying: "retrying" }[kind];
    if (!outcome) return;
    const second = Math.floor(event.at);
    const tally = this.outcomes.get(second) || { succeeded: 0, failed: 0, retrying: 0 };
    tally[outcome] += 1;
    this.outcomes.set(second, tally);
    if (kind === "succeeded" && typeof event.duration_s === "number") {
      const bucket = Math.floor(event.at / (SAMPLE_MS / 1000)) * (SAMPLE_MS / 1000);
      if (!this.runTimes.has(bucket)) this.runTimes.set(bucket, []);
      this.runTimes.get(bucket).push(event.duration_s);
    }
  }

  /** uPlot data of queue depth: one line per stage, region and priority seen in the window. */
  depthData() {
    const keys = [...new Set(this.depth.flatMap((point) => [...point.byKey.keys()]))].sort();
    const xs = this.depth.map((point) => point.t);
    return { keys, data: [xs, ...keys.map((key) => this.depth.map((point) => point.byKey.get(key) || 0))] };
  }

  throughputData() {
    const now = Math.floor(Date.now() / 1000) - 1; // the current second is still counting
    const xs = [];
    const lines = { succeeded: [], failed: [], retrying: [] };
    const first = Math.max(now - WINDOW_S, Math.min(now, ...this.outcomes.keys()));
    for (let second = first; second <= now; second++) {
      xs.push(second);
      const tally = this.outcomes.get(second) || { succeeded: 0, failed: 0, retrying: 0 };
      for (const name of Object.keys(lines)) lines[name].push(tally[name]);
    }
    return [xs, lines.succeeded, lines.failed, lines.retrying];
  }

  latencyData() {
    const buckets = [...this.runTimes.keys()].sort((a, b) => a - b);
    const pick = (values, q) => values[Math.min(values.length - 1, Math.floor(q * values.length))];
    const p50 = [];
    const p95 = [];
    const max = [];
    for (const bucket of buckets) {
      const values = [...this.runTimes.get(bucket)].sort((a, b) => a - b);
      p50.push(pick(values, 0.5));
      p95.push(pick(values, 0.95));
      max.push(values[values.length - 1]);
    }
    return [buckets, p50, p95, max];
  }
}

function chart(container, title, names, data, yLabel) {
  const width = Math.max(320, container.clientWidth || 480);
  const options = {
    title,
    width,
    height: 220,
    scales: { x: { time: true } },
    axes: [{}, { label: yLabel, size: 60 }],
    series: [{}, ...names.map((name, i) => ({ label: name, stroke: COLORS[i % COLORS.length], width: 1.5, points: { show: false } }))],
  };
  return new uPlot(options, data, container);
}

/** A chart that follows its data: redrawn in place, rebuilt when its lines change. */
class LiveChart {
  constructor(container, title, yLabel) {
    this.container = container;
    this.title = title;
    this.yLabel = yLabel;
    this.plot = null;
    this.names = null;
  }

  update(names, data) {
    if (this.plot && names.join("\n") === this.names.join("\n")) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.names = names;
    this.plot = chart(this.container, this.title, names, data, this.yLabel);
  }

  destroy() {
    if (this.plot) this.plot.destroy();
  }
}

export function renderOverview(root, series) {
  const counts = h("div", { class: "counts", id: "counts" });
  const depthBox = h("div", { class: "chart", id: "chart-depth" });
  const throughputBox = h("div", { class: "chart", id: "chart-throughput" });
  const latencyBox = h("div", { class: "chart", id: "chart-latency" });
  const queues = h("tbody");
  const workers = h("tbody");
  const breakers = h("tbody");
  const problem = h("p", { class: "error" });
  fill(
    root,
    h("h1", {}, "Overview"),
    problem,
    counts,
    h("div", { class: "charts" }, depthBox, throughputBox, latencyBox),
    h("h2", {}, "Waiting now"),
    h("table", { id: "queues" }, h("thead", {}, h("tr", {}, ["stage", "region", "priority", "type", "tasks"].map((c) => h("th", {}, c)))), queues),
    h("h2", {}, "Workers"),
    h(
      "table",
      { id: "workers" },
      h("thead", {}, h("tr", {}, ["worker", "region", "state", "load", "waiting", "handler types", "finished", "heartbeat"].map((c) => h("th", {}, c)))),
      workers,
    ),
    h("h2", {}, "Circuit breakers"),
    h("table", { id: "breakers" }, h("thead", {}, h("tr", {}, ["region", "type", "state", "since", "until", "reason"].map((c) => h("th", {}, c)))), breakers),
  );
  const depth = new LiveChart(depthBox, "Queue depth (tasks waiting, by stage, region and priority)", "tasks");
  const throughput = new LiveChart(throughputBox, "Throughput (outcomes per second, from the live feed)", "per s");
  const latency = new LiveChart(latencyBox, "Run time of succeeded tasks (per 2 s)", "seconds");

  function draw() {
    problem.textContent = series.error ? `The API did not answer: ${series.error}` : "";
    if (series.counts) {
      const total = Object.values(series.counts).reduce((a, b) => a + b, 0);
      fill(
        counts,
        h("div", { class: "count total", dataset: { status: "total" } }, h("span", { class: "n" }, total), h("span", {}, "tasks")),
        STATUSES.map((status) =>
          h(
            "a",
            { class: `count status-${status}`, href: `#/tasks?status=${status}`, dataset: { status } },
            h("span", { class: "n" }, series.counts[status] ?? 0),
            h("span", {}, status),
          ),
        ),
      );
    }
    const { keys, data } = series.depthData();
    depth.update(keys, data);
    throughput.update(["succeeded", "failed or dead", "retrying"], series.throughputData());
    latency.update(["p50", "p95", "max"], series.latencyData());
    fill(
      queues,
      series.queues
        .filter((q) => q.tasks > 0)
        .sort((a, b) => b.tasks - a.tasks)
        .map((q) => h("tr", {}, h("td", {}, q.stage), h("td", {}, q.region || "—"), h("td", {}, q.priority), h("td", {}, q.type || "—"), h("td", { class: "num" }, q.tasks))),
    );
    if (!queues.children.length) queues.append(h("tr", {}, h("td", { colspan: 5, class: "empty" }, "Nothing waits.")));
    const now = Date.now() / 1000;
    fill(
      workers,
      series.workers.map((w) =>
        h(
          "tr",
          { dataset: { worker: w.id } },
          h("td", {}, w.id),
          h("td", {}, w.region),
          h("td", {}, badge(w.state)),
          h("td", { class: "num" }, `${w.running} / ${w.concurrency}`),
          h("td", { class: "num" }, w.waiting),
          h("td", {}, w.types.join(", ")),
          h("td", {}, Object.entries(w.finished || {}).map(([k, v]) => `${k} ${v}`).join(", ") || "—"),
          h("td", {}, `${duration(Math.max(0, now - w.heartbeat_at))} ago`),
        ),
      ),
    );
    if (!workers.children.length) workers.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No live worker.")));
    fill(
      breakers,
      series.breakers.map((b) =>
        h(
          "tr",
          {},
          h("td", {}, b.region),
          h("td", {}, b.type),
          h("td", {}, badge(b.state)),
          h("td", {}, time(b.since)),
          h("td", {}, b.until ? time(b.until) : "—"),
          h("td", {}, b.reason || "—"),
        ),
      ),
    );
    if (!breakers.children.length) breakers.append(h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No breaker has opened.")));
  }

  series.onSample = draw;
  draw();
  return () => {
    series.onSample = null;
    depth.destroy();
    throughput.destroy();
    latency.destroy();
  };
}
