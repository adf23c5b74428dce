"""A raw pipeline stage for the ceiling benchmark: plain nats-py, no streamsched code.

``python -m streamsched.bench.stage STYLE URL STREAM CONSUMER [OUT_SUBJECT]`` pulls
continuously (requests of 500 kept outstanding) and acks each message, after republishing
it to OUT_SUBJECT and waiting for the PubAcks when one is given. It stops after 600 s.

Two styles of taking delivered messages, both with nats-py's public client:

* ``reference``: the straightforward nats-py consumer loop (two requests of 500 to start,
  more whenever the credit falls below 500; ``next_msg()`` for every message). The
  throughput target is judged on the pipeline of these stages.
* ``lean``: ``next_msg()`` for the first message of a burst, then the rest straight from the
  subscription's queue, without ``next_msg()``'s task and timer per message. About twice
  as fast; reported beside it so that nobody mistakes the reference for the best nats-py does.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import nats

BATCH = 500
STYLES = ("reference", "lean")


async def _take_reference(sub: Any) -> list[Any]:
    first = await sub.next_msg(timeout=1.0)
    msgs = [first]
    while len(msgs) < BATCH and not sub._pending_queue.empty():
        msgs.append(await sub.next_msg(timeout=0.1))
    return msgs


async def _take_lean(sub: Any) -> list[Any]:
    first = await sub.next_msg(timeout=1.0)
    msgs = [first]
    while len(msgs) < BATCH and sub._pending_queue.qsize():
        msgs.append(sub._pending_queue.get_nowait())
    return msgs


async def _stage(style: str, url: str, stream: str, consumer: str, out_subject: str | None) -> None:
    """Pull continuously from ``consumer``; forward to ``out_subject`` (then ack) or just ack."""
    take = _take_reference if style == "reference" else _take_lean
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=BATCH * 4)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_msgs_limit=-1)
    request = json.dumps({"batch": BATCH}).encode()
    api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    # The reference starts with two requests outstanding, then tops up below one batch.
    credit = 0
    for _ in range(2 if style == "reference" else 1):
        await nc.publish(api, request, reply=inbox)
        credit += BATCH
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            msgs = await take(sub)
        except nats.errors.TimeoutError:
            continue
        msgs = [m for m in msgs if m.reply]  # drop status messages (408 and the like)
        credit -= len(msgs)
        while credit < BATCH:
            await nc.publish(api, request, reply=inbox)
            credit += BATCH
        if out_subject:
            futures = [await js.publish_async(out_subject, m.data) for m in msgs]
            await asyncio.gather(*futures)
        for m in msgs:
            await m.ack()


if __name__ == "__main__":
    style, url, stream, consumer, *out = sys.argv[1:]
    if style not in STYLES:
        raise SystemExit(f"style must be one of {', '.join(STYLES)}, not {style!r}")
    asyncio.run(_stage(style, url, stream, consumer, out[0] if out else None))
