// Building the page: every value shown goes in as text (textContent), never as HTML, since
// task ids, payloads and errors are whatever a user submitted.

/** An element: `h("td", {class: "x", onclick: f}, "text", child, ...)`. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";

/** An SVG element, as `h` makes HTML ones. */
export function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace `node`'s children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

export function time(seconds) {
  if (!seconds) return "—";
  const at = new Date(seconds * 1000);
  return `${at.toLocaleTimeString([], { hour12: false })}.${String(at.getMilliseconds()).padStart(3, "0")}`;
}

export function dateTime(seconds) {
  if (!seconds) return "—";
  const at = new Date(seconds * 1000);
  return `${at.toLocaleDateString()} ${time(seconds)}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  if (seconds < 1) return `${(seconds * 1000).toFixed(0)} ms`;
  if (seconds < 120) return `${seconds.toFixed(2)} s`;
  return `${(seconds / 60).toFixed(1)} min`;
}

export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function progressBar(fraction) {
  if (fraction === null || fraction === undefined) return "";
  const percent = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
  return h("span", { class: "progress", title: `${percent} %` }, h("span", { class: "track" }, h("span", { class: "fill", style: `width:${percent}%` })), h("em", {}, `${percent} %`));
}

let flashTimer = null;

/** A short message at the bottom of the page (errors in red). */
export function flash(message, error = false) {
  const node = document.getElementById("flash");
  node.textContent = message;
  node.className = error ? "error shown" : "shown";
  clearTimeout(flashTimer);
  flashTimer = setTimeout(() => (node.className = ""), error ? 8000 : 4000);
}

/** Run `action` once the user confirms `question`; report its outcome. */
export async function confirmed(question, action, done) {
  if (!window.confirm(question)) return;
  try {
    const answer = await action();
    flash(done(answer));
  } catch (error) {
    flash(error.message, true);
  }
}

/**
 * What a view calls on each event that may change it: `fn` at most once per `ms`, and once
 * more `settleMs` after the last event, since an event reaches the feed before the task's
 * state is written (the projector writes it in batches, within a second).
 */
export function refresher(fn, ms, settleMs = 1500) {
  const soon = throttle(fn, ms);
  let settle = null;
  return () => {
    soon();
    clearTimeout(settle);
    settle = setTimeout(fn, settleMs);
  };
}

/** `fn`, called at most once per `ms` (the last call wins, run at the end of the wait). */
export function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}
