// The API as the page reads it: JSON requests with the bearer token when the server wants
// one (asked once, kept for the tab in sessionStorage), and the SSE feed read through
// fetch (EventSource cannot send the token).

const TOKEN_KEY = "streamsched.token";

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let asking = null;

/** Ask for the token once, however many requests were refused together; true if one was given. */
function askToken() {
  if (!asking) {
    asking = Promise.resolve().then(() => {
      const token = window.prompt("This API needs its token (STREAMSCHED_API_TOKEN):");
      if (token && token.trim()) sessionStorage.setItem(TOKEN_KEY, token.trim());
      setTimeout(() => (asking = null), 0);
      return Boolean(token && token.trim());
    });
  }
  return asking;
}

async function send(method, path, body, retried = false) {
  const sent = sessionStorage.getItem(TOKEN_KEY);
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const answer = await fetch(path, init);
  if (answer.status === 401 && !retried) {
    // Another request may have been given the token meanwhile: ask only if it is still the one refused.
    if (sessionStorage.getItem(TOKEN_KEY) !== sent || (await askToken())) return send(method, path, body, true);
  }
  const text = await answer.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!answer.ok) throw new ApiError(answer.status, (data && (data.error || data.detail)) || `${answer.status} ${answer.statusText}`);
  return data;
}

export const get = (path) => send("GET", path);
export const post = (path, body) => send("POST", path, body);

/** `path` with the query `params` (arrays repeat the name; empty values are left out). */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const one of Array.isArray(value) ? value : [value]) {
      if (one !== undefined && one !== null && one !== "") query.append(name, String(one));
    }
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/**
 * Follow the SSE feed at `path`, calling `onEvent(kind, data)` for each event and
 * `onState("live" | "offline")` as the connection comes and goes; reconnects by itself.
 * Returns a function that stops it.
 */
export function follow(path, onEvent, onState) {
  let stopped = false;
  let controller = null;
  async function run() {
    let wait = 500;
    while (!stopped) {
      controller = new AbortController();
      try {
        const answer = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal: controller.signal });
        if (!answer.ok || !answer.body) throw new Error(`feed answered ${answer.status}`);
        onState("live");
        wait = 500;
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          // Lines may end in CRLF (Litestar writes them so); a CR at the chunk's end waits for its LF.
          buffer = (buffer + value).replace(/\r\n/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            dispatch(buffer.slice(0, end), onEvent);
            buffer = buffer.slice(end + 2);
          }
        }
      } catch (error) {
        if (stopped) return;
      }
      onState("offline");
      await new Promise((resolve) => setTimeout(resolve, wait));
      wait = Math.min(wait * 2, 10000);
    }
  }
  run();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}

function dispatch(block, onEvent) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;
  try {
    onEvent(kind, JSON.parse(data.join("\n")));
  } catch {
    // not JSON: not an event of ours
  }
}
