// The live feed of events (SSE), one connection for the whole page, handed to whichever
// views listen.

import { follow } from "./api.js";

const listeners = new Set();

/** Call `onEvent(kind, event)` for each event from now on; returns the function that stops it. */
export function onFeed(onEvent) {
  listeners.add(onEvent);
  return () => listeners.delete(onEvent);
}

/** Open the feed; `onState("live" | "offline")` as the connection comes and goes. */
export function startFeed(onState) {
  return follow(
    "/api/v1/events",
    (kind, event) => {
      for (const listener of listeners) listener(kind, event);
    },
    onState,
  );
}
