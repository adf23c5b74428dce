"""CPU per publish through nats-py's ``Client.publish`` and through :func:`streamsched.transport.wire.send`.

``python -m streamsched.bench.publish_cost`` (starts its own nats-server).
"""

from __future__ import annotations

import asyncio

import nats

from ..transport.wire import send


async def compare(count: int = 100_000) -> None:
    """Print the CPU cost of one publish through nats-py and through :func:`send`."""
    import tempfile
    import time
    from pathlib import Path

    from ..transport.server import NatsServer, free_port

    server = NatsServer(port=free_port(), store_dir=Path(tempfile.mkdtemp(prefix="streamsched-wire-"))).start()
    try:
        nc = await nats.connect(server.url)
        headers = {"Nats-Msg-Id": "t123456:sched:1", "Streamsched-Task-Id": "t123456", "Streamsched-Type": "noop"}
        body = b'{"id":"t123456","type":"noop","payload":null}'
        for name in ("nats-py", "wire.send"):
            began = time.process_time()
            for i in range(count):
                if name == "nats-py":
                    await nc.publish("bench.wire", body, reply="_INBOX.x.1", headers=headers)
                else:
                    send(nc, "bench.wire", body, "_INBOX.x.1", headers)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)  # let the flusher write, as awaiting publish does
            await nc.flush()
            print(f"{name:10} {1e6 * (time.process_time() - began) / count:6.2f} µs per publish")
        await nc.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(compare())
