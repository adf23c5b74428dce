"""CPU per publish through nats-py's ``Client.publish`` and through :mod:`streamsched.transport.wire`'s two routes.

``python -m streamsched.bench.publish_cost`` (starts its own nats-server). ``wire fast``
is the send a connection gets from :func:`~streamsched.transport.wire.install` when
nats-py has the pieces it borrows; ``wire nats-py`` is the one it falls back to.
"""

from __future__ import annotations

import asyncio

import nats

from ..transport import wire


async def compare(count: int = 100_000) -> None:
    """Print the CPU cost of one publish through nats-py and through each route of ``wire``."""
    import tempfile
    import time
    from pathlib import Path

    from ..transport.server import NatsServer, free_port

    server = NatsServer(port=free_port(), store_dir=Path(tempfile.mkdtemp(prefix="streamsched-wire-"))).start()
    try:
        nc = await nats.connect(server.url)
        sends = {"wire fast": wire.install(nc).send, "wire nats-py": wire._send_through_nats_py}
        headers = {"Nats-Msg-Id": "t123456:sched:1", "Streamsched-Task-Id": "t123456", "Streamsched-Type": "noop"}
        body = b'{"id":"t123456","type":"noop","payload":null}'
        for name in ("nats-py", *sends):
            began = time.process_time()
            for i in range(count):
                if name == "nats-py":
                    await nc.publish("bench.wire", body, reply="_INBOX.x.1", headers=headers)
                else:
                    sends[name](nc, "bench.wire", body, "_INBOX.x.1", headers)
                    if i % 1000 == 0:
                        await asyncio.sleep(0)  # let the flusher write, as awaiting publish does
            await nc.flush()
            print(f"{name:12} {1e6 * (time.process_time() - began) / count:6.2f} µs per publish")
        await nc.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(compare())
