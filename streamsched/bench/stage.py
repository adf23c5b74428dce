"""A raw pipeline stage for the ceiling benchmark: plain nats-py, no streamsched code.

``python -m streamsched.bench.stage URL STREAM CONSUMER [OUT_SUBJECT]`` pulls continuously
(requests of 500 kept outstanding) and acks each message, after republishing it to
OUT_SUBJECT and waiting for the PubAcks when one is given. It stops after 600 s.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats

BATCH = 500


async def _stage(url: str, stream: str, consumer: str, out_subject: str | None) -> None:
    """Pull continuously from ``consumer``; forward to ``out_subject`` (then ack) or just ack."""
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    js = nc.jetstream(publish_async_max_pending=BATCH * 4)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, pending_msgs_limit=-1)
    request = json.dumps({"batch": BATCH}).encode()
    credit = 0
    api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        while credit < BATCH:
            await nc.publish(api, request, reply=inbox)
            credit += BATCH
        try:
            first = await sub.next_msg(timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        msgs = [first]
        while len(msgs) < BATCH and sub._pending_queue.qsize():
            msgs.append(sub._pending_queue.get_nowait())
        msgs = [m for m in msgs if m.reply]
        credit -= len(msgs)
        if out_subject:
            futures = [await js.publish_async(out_subject, m.data) for m in msgs]
            await asyncio.gather(*futures)
        for m in msgs:
            await m.ack()


if __name__ == "__main__":
    url, stream, consumer, *out = sys.argv[1:]
    asyncio.run(_stage(url, stream, consumer, out[0] if out else None))
