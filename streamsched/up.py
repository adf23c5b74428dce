"""``streamsched up``: the whole system on one machine, for a laptop or a demo.

Starts an embedded nats-server (unless given ``--nats-url``), applies the streams, then
launches one plain subprocess per role (``streamsched master``, ``regional``,
``projector``, ``worker``) so both cores work. It is not a supervisor: if a role dies,
``up`` stops the others and exits non-zero. Production runs each role on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from .config import Settings
from .transport import streams
from .transport.bus import Bus
from .transport.server import NatsServer, default_config

log = logging.getLogger("streamsched.up")


@dataclass(frozen=True)
class UpOptions:
    """What ``streamsched up`` was asked for."""

    port: int = 4222
    data_dir: Path = Path(".streamsched")
    workers: int = 1
    concurrency: int = 16
    handlers: str = "workers.examples"
    nats_url: str | None = None
    monitor_port: int | None = 8222


def role_commands(settings: Settings, options: UpOptions) -> list[list[str]]:
    """One command line per role process."""
    me = [sys.executable, "-m", "streamsched"]
    commands = [[*me, "master"], [*me, "projector"]]
    for region in settings.regions:
        commands.append([*me, "regional", "--region", region])
        for _ in range(options.workers):
            commands.append([*me, "worker", options.handlers, "--region", region, "--concurrency", str(options.concurrency)])
    return commands


def run(settings: Settings, options: UpOptions) -> int:
    """Start everything, wait for a signal (or a role to die), stop everything. Returns the exit code."""
    server = None
    url = options.nats_url
    if url is None:
        server = NatsServer(
            port=options.port,
            store_dir=options.data_dir.resolve() / "jetstream",
            config=default_config(),
            monitor_port=options.monitor_port,
        ).start()
        url = server.url
    settings = Settings.load({}, **{**_as_dict(settings), "nats_url": url})
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            for child in children:
                if child.poll() is None:
                    child.kill()
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for change in anyio.run(_apply, settings):
            log.info("%s", change)
        env = dict(os.environ, NATS_URL=url, STREAMSCHED_REGIONS=",".join(settings.regions))
        for command in role_commands(settings, options):
            children.append(subprocess.Popen(command, env=env))
        _banner(url, settings, options, server)
        while not stopping:
            dead = [c for c in children if c.poll() is not None]
            if dead:
                log.error("role %s exited with %s; stopping the others", " ".join(dead[0].args[3:]), dead[0].returncode)
                code = 1
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.grace_s + 10
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if server is not None:
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


async def _apply(settings: Settings) -> list[streams.Change]:
    bus = await Bus.connect(settings.nats_url, name="streamsched-up")
    try:
        return await streams.apply(bus, settings)
    finally:
        await bus.close()


def _as_dict(settings: Settings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__struct_fields__}


def _banner(url: str, settings: Settings, options: UpOptions, server: NatsServer | None) -> None:
    where = f"embedded nats-server, data in {server.store_dir}" if server else "existing server"
    monitor = f"\n  monitoring:  http://127.0.0.1:{options.monitor_port}/jsz" if server and options.monitor_port else ""
    print(
        f"""
streamsched is up
  NATS:        {url}   ({where}){monitor}
  regions:     {", ".join(settings.regions)}   workers per region: {options.workers} x {options.concurrency} slots
  handlers:    {options.handlers}

Submit a task from any NATS client:
  nats pub tasks.submit '{{"type":"echo","payload":{{"hello":"world"}}}}'
or with the CLI:
  streamsched submit echo --payload '{{"hello":"world"}}' --wait

Ctrl-C stops everything (running tasks get {settings.grace_s:.0f}s to finish).
""",
        flush=True,
    )
