"""The ``peers`` scenario: Celery + Redis, Dramatiq + Redis and taskiq + taskiq-nats running
the same no-op workload as ``throughput``, in the same run, each in the best obvious setup
for two cores (README.md in this folder says which and why).

Each peer gets a broker of its own (redis-server, or nats-server with file storage), its
worker is started and warmed up with 200 tasks, then N tasks are submitted while the
worker consumes them; tasks/s = N / (last completion - first submit), with completions
counted from the workers' progress files (see :mod:`.recorder`). CPU is measured per
process over the same window, the bench process being the submitter.

The peer libraries are an optional extra (``pip install -e '.[peers]'``) and redis-server
comes from apt; without them the scenario returns a skipped result instead of failing.
Each peer module has the same shape: ``NAME``, ``CONFIG``, ``BROKER``, ``N``, ``worker()``
(command and extra environment) and ``submitter(url)`` (yields ``send(count, stamped)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from ...transport.server import NatsServer, free_port
from ..harness import CpuMeter, server_pid
from . import recorder

INSTALL_HINT = "install with: pip install -e '.[peers]' and apt-get install redis-server"
#: Tasks each worker runs before the measured window.
WARMUP = 200
WARMUP_TIMEOUT_S = 120.0
#: The longest a peer may take over its N tasks.
RUN_TIMEOUT_S = 300.0
LIBRARIES = ("celery", "kombu", "dramatiq", "redis", "taskiq", "taskiq_nats")
VERSIONS = ("celery", "kombu", "dramatiq", "redis", "hiredis", "taskiq", "taskiq-nats")


def blocking_sender(send_one: Callable[[float], Any]) -> Callable[[int, bool], Awaitable[None]]:
    """``send(count, stamped)`` for a client whose send is a blocking round trip (Celery, Dramatiq):
    the loop runs in a thread so that the event loop stays free."""

    def loop(count: int, stamped: bool) -> None:
        for _ in range(count):
            send_one(time.time() if stamped else 0.0)

    async def send(count: int, stamped: bool) -> None:
        await asyncio.to_thread(loop, count, stamped)

    return send


def unavailable() -> str | None:
    """Why the scenario cannot run here, or None when it can."""
    missing = []
    for name in LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    return f"{', '.join(missing)} not found; {INSTALL_HINT}" if missing else None


async def run(scale: int = 1) -> dict[str, Any]:
    """Every peer in turn; a peer that fails is reported as such and the others still run."""
    reason = unavailable()
    if reason:
        return {"scenario": "peers", "skipped": reason}
    from . import celery_peer, dramatiq_peer, taskiq_peer

    rows = []
    for peer in (celery_peer, dramatiq_peer, taskiq_peer):
        n = peer.N // scale
        try:
            rows.append(await measure(peer, n))
        except Exception as error:  # noqa: BLE001 - one peer's failure must not lose the others' figures
            rows.append({"name": peer.NAME, "config": peer.CONFIG, "n": n, "error": f"{type(error).__name__}: {error}"})
    return {"scenario": "peers", "warmup": WARMUP, "peers": rows, "versions": _versions()}


async def measure(peer: ModuleType, n: int) -> dict[str, Any]:
    """One peer: its broker and worker started, warmed up, then N tasks submitted while it consumes."""
    with tempfile.TemporaryDirectory(prefix="streamsched-peers-") as folder:
        tmp = Path(folder)
        progress = tmp / "progress"
        progress.mkdir()
        async with _broker(peer.BROKER, tmp) as (url, broker_name, broker_pid), peer.submitter(url) as send:
            command, extra_env = peer.worker()
            env = dict(os.environ, **extra_env, **{recorder.BROKER_URL_ENV: url, recorder.PROGRESS_DIR_ENV: str(progress)})
            log = tmp / "worker.log"
            with open(log, "wb") as out:
                worker = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                await send(WARMUP, False)
                await _completed(progress, WARMUP, worker, log, WARMUP_TIMEOUT_S)
                # Dramatiq and taskiq run the tasks in child processes, forked by now.
                children = psutil.Process(worker.pid).children(recursive=True)
                pids = {"worker": worker.pid, **{f"worker.{c.pid}": c.pid for c in children}, broker_name: broker_pid}
                meter = CpuMeter(pids).start()
                began = time.time()
                await send(n, True)
                submitted = time.time()
                last = await _completed(progress, WARMUP + n, worker, log, RUN_TIMEOUT_S)
                cpu = meter.stop()
            finally:
                _stop(worker)
    cpu_us = {"submitter": 0.0, "worker": 0.0, broker_name: 0.0}
    for name, seconds in cpu.items():
        role = "submitter" if name == "driver" else name.split(".")[0]
        cpu_us[role] += 1e6 * seconds / n
    return {
        "name": peer.NAME,
        "config": peer.CONFIG,
        "n": n,
        "tasks_per_s": n / (last - began),
        "submit_per_s": n / (submitted - began),
        "cpu_us_per_task": cpu_us,
        "cpu_us_per_task_total": sum(cpu_us.values()),
    }


@contextlib.asynccontextmanager
async def _broker(kind: str, tmp: Path) -> AsyncIterator[tuple[str, str, int]]:
    """A fresh broker on a free loopback port: yields its URL, process name and PID."""
    if kind == "nats":
        server = NatsServer(port=free_port(), store_dir=tmp / "nats").start()
        try:
            yield server.url, "nats-server", server_pid(server)
        finally:
            server.stop()
        return
    port = free_port()
    command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(tmp), "--logfile", str(tmp / "redis.log")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        await _redis_ready(port, process)
        yield f"redis://127.0.0.1:{port}/0", "redis-server", process.pid
    finally:
        _stop(process)


async def _redis_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        await asyncio.sleep(0.02)
    raise TimeoutError(f"redis-server did not answer on port {port} within {timeout_s}s")


async def _completed(progress: Path, target: int, worker: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    """Wait (bounded) until ``target`` completions are recorded; returns the time of the last one."""
    deadline = time.monotonic() + timeout_s
    while True:
        count, last = recorder.progress(progress)
        if count >= target:
            return last
        if worker.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"worker exited with {worker.returncode} after {count}/{target} tasks: " + " | ".join(tail))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count}/{target} tasks done after {timeout_s:.0f}s")
        await asyncio.sleep(0.01)


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM a process we started, then SIGKILL it and whatever children it left."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["redis-server"] = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    return out
