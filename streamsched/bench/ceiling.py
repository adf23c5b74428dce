"""The raw engine, measured in the same run as streamsched, so results can be given as ratios.

Measurements with plain nats-py and no streamsched code:

* publish: N JetStream async publishes, at most 4000 in flight;
* consume: one process drains them with a continuous pull and acks each;
* pipeline: submitter → stream A → stage process (pull, republish to B, wait for the
  PubAcks, ack A) → stage process (pull B, ack), each stage with continuous pull. Twice:
  with the reference stages (``pipeline_*``, the targets' reference), then with leaner
  stages (``lean_pipeline_*``); see :mod:`streamsched.bench.stage`.

Stage processes run ``python -m streamsched.bench.stage STYLE URL STREAM CONSUMER [OUT_SUBJECT]``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StorageType, StreamConfig

from ..transport.server import NatsServer, free_port
from .harness import CpuMeter, server_messages, server_pid, wait_until


async def _publish(js: Any, subject: str, n: int) -> float:
    began = time.monotonic()
    futures = [await js.publish_async(subject, b"%.6f" % time.time()) for _ in range(n)]
    await asyncio.gather(*futures)
    return time.monotonic() - began


async def _stream(js: Any, name: str, subject: str) -> None:
    await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
    await js.add_consumer(name, ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60))


def _spawn(style: str, url: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "streamsched.bench.stage", style, url, *args])


async def _drained(js: Any, stream: str) -> bool:
    info: ConsumerInfo = await js.consumer_info(stream, "c")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def ceiling(n: int = 100_000, pipeline_n: int = 40_000) -> dict[str, Any]:
    """Raw publish, pull+ack and two-hop pipeline rates on a fresh server."""
    import tempfile
    from pathlib import Path

    server = NatsServer(port=free_port(), store_dir=Path(tempfile.mkdtemp(prefix="streamsched-ceiling-")), monitor_port=free_port()).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream(publish_async_max_pending=4000)
        await _stream(js, "RAWPUB", "raw.pub")
        publish_s = await _publish(js, "raw.pub", n)

        consumer = _spawn("lean", server.url, "RAWPUB", "c")
        procs.append(consumer)
        began = time.monotonic()
        await wait_until(lambda: _drained(js, "RAWPUB"), timeout_s=300, poll_s=0.02)
        consume_s = time.monotonic() - began
        consumer.kill()
        consumer.wait()

        reference = await _two_hop(server, js, procs, "reference", pipeline_n)
        lean = await _two_hop(server, js, procs, "lean", pipeline_n)
        await nc.close()
        return {
            "scenario": "ceiling",
            "publish_per_s": n / publish_s,
            "consume_per_s": n / consume_s,
            # The targets' reference: stages that take each message with next_msg().
            **{f"pipeline_{key}": value for key, value in reference.items()},
            **{f"lean_pipeline_{key}": value for key, value in lean.items()},
        }
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.stop()


async def _two_hop(server: NatsServer, js: Any, procs: list[subprocess.Popen[bytes]], style: str, n: int) -> dict[str, Any]:
    """Submitter → stream A → stage → stream B → stage, with stages of ``style`` (see stage.py)."""
    a, b = f"RAWA{style.upper()}", f"RAWB{style.upper()}"
    await _stream(js, a, f"raw.{style}.a")
    await _stream(js, b, f"raw.{style}.b")
    stage_a = _spawn(style, server.url, a, "c", f"raw.{style}.b")
    stage_b = _spawn(style, server.url, b, "c")
    procs += [stage_a, stage_b]
    await _publish(js, f"raw.{style}.a", 500)  # warm-up
    await wait_until(lambda: _acked(js, b, 500), timeout_s=60, poll_s=0.02)
    meter = CpuMeter({"nats-server": server_pid(server), "stage-a": stage_a.pid, "stage-b": stage_b.pid}).start()
    messages_before = await server_messages(server)
    began = time.monotonic()
    await _publish(js, f"raw.{style}.a", n)
    await wait_until(lambda: _acked(js, b, 500 + n), timeout_s=300, poll_s=0.02)
    seconds = time.monotonic() - began
    cpu = meter.stop()
    messages_after = await server_messages(server)
    for stage in (stage_a, stage_b):  # the next pipeline gets the cores to itself
        stage.kill()
        stage.wait()
    return {
        "per_s": n / seconds,
        "cpu_us_per_task": {k: 1e6 * v / n for k, v in cpu.items()},
        "server_in_out_per_task": [(after - before) / n for before, after in zip(messages_before, messages_after, strict=True)],
    }


async def _acked(js: Any, stream: str, count: int) -> bool:
    info: ConsumerInfo = await js.consumer_info(stream, "c")
    return info.ack_floor is not None and info.ack_floor.stream_seq >= count
