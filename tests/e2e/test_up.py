"""`streamsched up`, the README's quick start: one command runs everything, keeps its roles
running, stops them in order, and says so in one line when a port is taken."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import psutil
import pytest

from streamsched.cli import Exit
from streamsched.config import Settings
from streamsched.eventlog.state import last_values
from streamsched.supervisor import RestartPolicy
from streamsched.transport import server as server_module
from streamsched.transport.bus import Bus
from streamsched.transport.server import (
    NatsServer,
    PortInUse,
    ServerStartError,
    free_port,
    port_in_use,
)
from streamsched.up import UpOptions, run

from ..conftest import REPO

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

UP = [sys.executable, "-m", "streamsched", "up"]


class UpProcess:
    """A ``streamsched up`` child; a thread collects its output line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen([*UP, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, wanted: Callable[[str], bool], timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if wanted(line)]
            if found:
                return found[0]
            assert self.popen.poll() is None, f"up exited with {self.popen.returncode}:\n{self.output[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"no such line within {timeout_s}s:\n{self.output[-3000:]}")

    def roles(self, kind: str) -> list[psutil.Process]:
        """The running role processes of one kind (``worker``, ``master`` ...)."""
        found = []
        for child in psutil.Process(self.popen.pid).children():
            try:
                if child.cmdline()[1:4] == ["-m", "streamsched", kind]:
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self, timeout_s: float = 60.0) -> int:
        """Ctrl-C (SIGINT) as a user would; the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(10)
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        return self.popen.returncode


@contextmanager
def running_up(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[UpProcess, int]]:
    """``up`` on a free port, without monitoring, its REST API on a free port unless ``args`` say
    otherwise; stopped (SIGINT) on the way out. Yields it and its NATS port."""
    port = free_port()
    api = [] if "--api-port" in args else ["--api-port", str(free_port())]
    up = UpProcess(["--port", str(port), "--monitor-port", "0", "--data-dir", str(tmp_path / "data"), *api, *args], env)
    try:
        yield up, port
    finally:
        up.stop()


async def connect(port: int):
    import nats

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            return await nats.connect(f"nats://127.0.0.1:{port}", max_reconnect_attempts=0, connect_timeout=0.5)
        except Exception:  # noqa: BLE001 - not up yet
            await anyio.sleep(0.1)
    raise AssertionError("streamsched up did not start nats-server")


FINAL = frozenset({"succeeded", "rejected", "dead", "failed"})


async def submit_and_wait(port: int, submissions: list[bytes], kinds: frozenset[str] = FINAL, timeout_s: float = 60.0) -> dict[str, str]:
    """Publish each to tasks.submit exactly as `nats pub` does; wait for an event of ``kinds``
    for each; the last such kind, by task id."""
    nc = await connect(port)
    outcomes: dict[str, str] = {}

    async def record(msg):
        # What any NATS client sees: a JSON array of events (of several tasks) per message.
        for event in json.loads(msg.data):
            if event["kind"] in kinds:
                outcomes[event["task_id"]] = event["kind"]

    await nc.subscribe("events.>", cb=record)
    await nc.flush()
    for data in submissions:
        await nc.publish("tasks.submit", data)  # a plain core publish, no headers
    await nc.flush()
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < len(submissions) and time.monotonic() < deadline:
        await nc.flush()
        await anyio.sleep(0.05)
    await nc.close()
    return outcomes


async def the_rest_api_runs_a_task(api_port: int) -> None:
    """What a user of ``up`` checks first: the API is live, and a task POSTed to it succeeds."""
    import httpx

    base = f"http://127.0.0.1:{api_port}"
    async with httpx.AsyncClient(base_url=base, timeout=5.0) as http:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "the REST API did not answer /health"
            await anyio.sleep(0.1)
        assert (await http.get("/ready")).status_code == 200
        (task_id,) = (await http.post("/api/v1/tasks", json={"type": "echo", "payload": {"via": "rest"}})).json()["ids"]
        while (state := (await http.get(f"/api/v1/tasks/{task_id}")).json()).get("status") != "succeeded":
            assert time.monotonic() < deadline + 30, state
            await anyio.sleep(0.1)
        assert state["result"] == {"via": "rest"}
        assert (await http.post("/api/v1/tasks", json={"type": "echo", "priority": "urgent"})).status_code == 422
        assert (await http.get("/api/v1/tasks/no-such-task")).status_code == 404
        assert "/api/v1/tasks" in (await http.get("/openapi.json")).json()["paths"]


def echo_tasks(prefix: str, count: int) -> list[bytes]:
    return [json.dumps({"id": f"{prefix}{i}", "type": "echo", "priority": ("high", "medium", "low")[i % 3]}).encode() for i in range(count)]


async def test_up_runs_the_whole_system_and_stops_cleanly_on_sigint(tmp_path: Path):
    api_port = free_port()
    with running_up(tmp_path, "--api-port", str(api_port)) as (up, port):
        outcomes = await submit_and_wait(port, [*echo_tasks("u", 100), *[b"this is not json"] * 5])
        await the_rest_api_runs_a_task(api_port)
        assert sum(1 for k in outcomes.values() if k == "succeeded") == 100
        assert sum(1 for k in outcomes.values() if k == "rejected") == 5
        # The projector yields the cores to the task pipeline (settings.projector_nice); the rest do not.
        base = os.nice(0)
        niceness = {kind: [p.nice() for p in up.roles(kind)] for kind in ("master", "regional", "projector", "worker")}
        assert niceness == {"master": [base], "regional": [base], "projector": [min(19, base + 10)], "worker": [base]}, niceness
    assert up.popen.returncode == 0, up.output[-3000:]
    assert f"nats://127.0.0.1:{port}" in up.output and "nats pub tasks.submit" in up.output
    assert "Roles are restarted if they exit" in up.output
    assert f"REST API:    http://127.0.0.1:{api_port}" in up.output


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports (tried from free ports the system gives)."""
    for _ in range(50):
        base = free_port()
        if base + count <= 65536 and not any(port_in_use(port) for port in range(base, base + count)):
            return base
    raise AssertionError(f"no {count} consecutive free ports found")


def serves_metrics(port: int, timeout_s: float = 30.0) -> bool:
    """Whether a role process on ``port`` is ready within ``timeout_s`` (connected, its roles
    pulling: it may be starting) and serves its /metrics."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                pass
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return b"process_cpu_seconds_total" in response.read()
        except OSError:  # not listening yet, or 503: not ready yet (urllib raises HTTPError, an OSError)
            time.sleep(0.1)
    return False


async def test_up_runs_replicas_of_every_role_each_with_its_name_and_metrics_port(tmp_path: Path):
    # 2 masters, 2 projectors, 2 regional schedulers in each of 2 regions, 1 worker in each.
    base = free_ports(10)
    args = ["--masters", "2", "--projectors", "2", "--regionals", "2", "--regions", "eu,us", "--metrics-port-base", str(base), "--api-port", "0"]
    with running_up(tmp_path, *args) as (up, port):
        submissions = [json.dumps({"id": f"rep{i}", "type": "echo", "region": ("eu", "us")[i % 2]}).encode() for i in range(40)]
        outcomes = await submit_and_wait(port, submissions)
        assert list(outcomes.values()).count("succeeded") == 40, outcomes
        assert {kind: len(up.roles(kind)) for kind in ("master", "projector", "regional", "worker")} == {
            "master": 2,
            "projector": 2,
            "regional": 4,
            "worker": 2,
        }
        assert "replicas:    masters 2, projectors 2, regional schedulers per region 2" in up.output
        # A projector partition each, the setting given to every role.
        projectors = up.roles("projector")
        assert sorted(p.cmdline()[p.cmdline().index("--partition") + 1] for p in projectors) == ["0", "1"]
        assert {p.environ().get("STREAMSCHED_PROJECTOR_PARTITIONS") for p in [*projectors, *up.roles("worker")]} == {"2"}
        assert f"ports {base}-{base + 9}" in up.output
        assert [metrics_port for metrics_port in range(base, base + 10) if not serves_metrics(metrics_port)] == []
    assert up.popen.returncode == 0, up.output[-3000:]
    assert "stopping master#1, master#2, regional eu#1, regional eu#2, regional us#1, regional us#2" in up.output
    assert "stopping projector#1, projector#2" in up.output


async def stored_states(port: int) -> dict[str, tuple[int, str]]:
    """Each task's state in KV ``tasks``: the sequence it was last written at, and its status."""
    bus = await Bus.connect(f"nats://127.0.0.1:{port}", name="test-up")
    try:
        entries = await last_values(bus, "KV_tasks", ["$KV.tasks.>"])
    finally:
        await bus.close()
    assert entries is not None
    return {subject.removeprefix("$KV.tasks."): (seq, json.loads(data)["status"]) for subject, seq, data in entries}


async def test_up_with_another_projectors_count_makes_new_durables_that_do_not_fold_the_history_again(tmp_path: Path):
    earlier: dict[str, tuple[int, str]] = {}
    for phase, projectors in enumerate((1, 2, 1)):
        with running_up(tmp_path, "--projectors", str(projectors), "--api-port", "0") as (up, port):
            outcomes = await submit_and_wait(port, echo_tasks(f"p{phase}-", 60))
            assert set(outcomes.values()) == {"succeeded"}
            deadline = time.monotonic() + 30
            while True:  # the view is written after the events: wait for it
                states = await stored_states(port)
                if sum(status == "succeeded" for _, status in states.values()) == 60 * (phase + 1):
                    break
                assert time.monotonic() < deadline, states
                await anyio.sleep(0.1)
        # The earlier phases' tasks were not written again: the new durables started past them.
        assert {task_id: states[task_id] for task_id in earlier} == earlier
        earlier = states
        if phase:
            durable = "projector-0" if projectors == 2 else "projector"
            assert any(f"created   consumer EVENTS/{durable} (from EVENTS sequence" in line for line in up.lines), up.output[-3000:]
            assert sum("deleted   consumer EVENTS/projector" in line for line in up.lines) == (1 if projectors == 2 else 2), up.output[-3000:]


async def test_a_killed_worker_is_restarted_and_the_next_tasks_succeed(tmp_path: Path):
    with running_up(tmp_path) as (up, port):
        up.wait_for_line(lambda line: "streamsched.worker: worker" in line and "handlers echo" in line)
        [worker] = up.roles("worker")
        launched_as = (worker.cmdline(), worker.environ())
        worker.kill()
        line = up.wait_for_line(lambda line: "worker default#1 exited" in line)
        assert "SIGKILL" in line and "restarting it in" in line, line
        up.wait_for_line(lambda line: "worker default#1 restarted" in line)
        [restarted] = up.roles("worker")
        assert restarted.pid != worker.pid
        assert (restarted.cmdline(), restarted.environ()) == launched_as
        outcomes = await submit_and_wait(port, echo_tasks("after-kill-", 30))
        assert list(outcomes.values()).count("succeeded") == 30, outcomes
        assert up.popen.poll() is None, "up stopped when a worker was killed"
        assert {kind: len(up.roles(kind)) for kind in ("master", "regional", "projector")} == {"master": 1, "regional": 1, "projector": 1}
    assert up.popen.returncode == 0, up.output[-3000:]


async def test_a_worker_drained_under_up_exits_cleanly_and_up_starts_a_new_one_in_its_place(tmp_path: Path):
    with running_up(tmp_path) as (up, port):
        up.wait_for_line(lambda line: "streamsched.worker: worker" in line and "handlers echo" in line)
        [worker] = up.roles("worker")
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCHED_")} | {"NATS_URL": f"nats://127.0.0.1:{port}"}
        worker_id = f"{socket.gethostname()}-{worker.pid}"
        listed = await anyio.run_process([sys.executable, "-m", "streamsched", "workers", "list", "--json"], env=env)
        assert worker_id in [json.loads(line)["id"] for line in listed.stdout.decode().splitlines()]

        drained = await anyio.run_process([sys.executable, "-m", "streamsched", "workers", "drain", worker_id], env=env, check=False)
        assert drained.returncode == 0, drained.stderr.decode()
        assert up.wait_for_line(lambda line: "worker default#1 exited" in line).rstrip().endswith("(drained); starting it again in 0.5 s")
        up.wait_for_line(lambda line: "worker default#1 restarted" in line)
        [replacement] = up.roles("worker")
        assert replacement.pid != worker.pid
        outcomes = await submit_and_wait(port, echo_tasks("after-drain-", 10))
        assert list(outcomes.values()).count("succeeded") == 10, outcomes
    assert up.popen.returncode == 0, up.output[-3000:]


async def test_a_second_ctrl_c_kills_at_once(tmp_path: Path):
    with running_up(tmp_path) as (up, port):
        long_task = json.dumps({"id": "long", "type": "sleep", "payload": {"seconds": 600}}).encode()
        assert await submit_and_wait(port, [long_task], kinds=frozenset({"started"})) == {"long": "started"}
        up.popen.send_signal(signal.SIGINT)
        up.wait_for_line(lambda line: "stopping worker default#1" in line)  # draining: it would wait grace_s (30 s) for the task
        children = psutil.Process(up.popen.pid).children()
        second = time.monotonic()
        up.popen.send_signal(signal.SIGINT)
        up.popen.wait(20)
        took = time.monotonic() - second
    assert took < 10, (took, up.output[-3000:])
    assert "SIGINT while stopping: killing everything now" in up.output
    assert len(children) == 6 and [child for child in children if child.is_running()] == []  # nats-server, master, projector, api, regional, worker


def test_ctrl_c_on_a_terminal_reaches_up_alone_and_it_stops_the_roles_in_order(tmp_path: Path):
    # A terminal sends Ctrl-C to its whole foreground process group: roles in that group
    # would all stop at once (nats-server among them) instead of in order.
    terminal, tty = pty.openpty()
    command = [*UP, "--port", str(free_port()), "--monitor-port", "0", "--api-port", "0", "--data-dir", str(tmp_path / "data")]
    up = subprocess.Popen(
        command,
        cwd=REPO,
        stdin=tty,
        stdout=tty,
        stderr=tty,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # one ioctl, no lock to deadlock on; makes the terminal up's, as a shell does
    )
    os.close(tty)
    output = b""

    def read_until(done: Callable[[bytes], bool], timeout_s: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout_s
        while not done(output) and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    output += os.read(terminal, 65536)
                except OSError:  # every process let go of the terminal: they all exited
                    return

    try:
        # Every role running (each logs its start once its signal handler is in place).
        started = (b"projector folding EVENTS", b"streamsched.worker: worker", b"master routing to regions", b"regional scheduler for region")
        read_until(lambda out: all(line in out for line in started), 30)
        os.write(terminal, b"\x03")
        read_until(lambda _: False, 60)
        up.wait(10)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        os.close(terminal)
    text = output.decode(errors="replace")
    assert up.returncode == 0, text[-3000:]
    stops = [text.index(f"streamsched.up: stopping {what}") for what in ("worker default#1", "master, regional default", "projector", "nats-server")]
    assert stops == sorted(stops), text[-3000:]
    assert "received SIGINT" not in text and text.count("received SIGTERM") == 4, text[-3000:]


class ChildWatch:
    """Records every child process of this one (and its command line) while ``up`` runs in
    it; SIGINTs it when ``stop_when()`` says so, or at the deadline (again later, to kill)."""

    def __init__(self, stop_when: Callable[[ChildWatch], bool], timeout_s: float) -> None:
        self.seen: dict[int, tuple[psutil.Process, list[str]]] = {}
        self.stop_when = stop_when
        self.timeout_s = timeout_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def of_kind(self, kind: str) -> list[list[str]]:
        """Command lines of the role processes (``worker`` ...) or ``nats-server`` seen, running or not."""
        return [
            cmdline
            for _, cmdline in list(self.seen.values())
            if cmdline and (cmdline[1:4] == ["-m", "streamsched", kind] or Path(cmdline[0]).name == kind)
        ]

    def _watch(self) -> None:
        started = time.monotonic()
        interrupts = 0
        while not self.done.wait(0.05):
            for child in psutil.Process().children(recursive=True):
                try:  # again each time: a child caught between fork and exec shows our command line
                    cmdline = child.cmdline()
                except psutil.NoSuchProcess:
                    continue
                if cmdline:  # empty while a process exits
                    self.seen[child.pid] = (self.seen.get(child.pid, (child, []))[0], cmdline)
            late = time.monotonic() - started > self.timeout_s + 20 * interrupts
            if (interrupts == 0 and self.stop_when(self)) or late:
                os.kill(os.getpid(), signal.SIGINT)
                interrupts += 1

    @contextmanager
    def running(self) -> Iterator[ChildWatch]:
        self.thread.start()
        try:
            yield self
        finally:
            self.done.set()
            self.thread.join(5)


def up_settings() -> Settings:
    return Settings.load({}, grace_s=5.0)


def test_a_crash_looping_worker_stops_everything_with_a_report(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="streamsched.up")
    # up.run in this process, so the backoff can be shortened (the CLI does not offer that).
    options = UpOptions(
        port=free_port(),
        monitor_port=0,
        data_dir=tmp_path / "data",
        handlers="no_such_module",
        restarts=RestartPolicy(delay_s=0.05, max_delay_s=0.2),
        api_port=0,
    )
    started = time.monotonic()
    with ChildWatch(lambda _: False, timeout_s=90).running() as watch:
        ok = run(up_settings(), options)
    took = time.monotonic() - started
    assert ok is False and took < 90, took
    [report] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert report.getMessage().startswith("worker default#1 exited 5 times within 60 s (exit code 1, exit code 1"), report.getMessage()
    assert "streamsched worker no_such_module --region default" in report.getMessage()
    restarts = [r.getMessage() for r in caplog.records if "worker default#1 exited with exit code 1" in r.getMessage()]
    assert len(restarts) == 4, restarts
    # Every process up started was seen (a worker lives for its imports, far longer than
    # the watch's 50 ms ticks), and none is left running.
    assert len(watch.of_kind("worker")) == 5
    for kind in ("master", "regional", "projector", "nats-server"):
        assert len(watch.of_kind(kind)) == 1, (kind, [c for _, c in watch.seen.values()])
    assert [cmdline for process, cmdline in watch.seen.values() if process.is_running()] == []
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping ")]
    assert stopped == ["stopping master, regional default", "stopping projector", "stopping nats-server"]


def test_a_taken_default_monitoring_port_falls_back_to_a_free_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    answered: list[int] = []

    def monitor_answers(watch: ChildWatch) -> bool:
        """The server's monitoring port answers /healthz, and every role has started."""
        if answered:
            return True
        servers = watch.of_kind("nats-server")
        if not servers or sum(len(watch.of_kind(kind)) for kind in ("master", "regional", "projector", "worker")) < 4:
            return False
        cmdline = servers[0]
        monitor = int(cmdline[cmdline.index("-m") + 1])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    answered.append(monitor)
        except OSError:
            pass
        return False

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        # As the CLI builds it when --monitor-port is left at its default (8222, here `busy`).
        options = UpOptions(port=free_port(), monitor_port=busy, monitor_port_fallback=True, data_dir=tmp_path / "data", api_port=0)
        with ChildWatch(monitor_answers, timeout_s=60).running():
            assert run(up_settings(), options) is True
    assert answered and answered[0] != busy
    banner = capsys.readouterr().out
    assert f"monitoring:  http://127.0.0.1:{answered[0]}/jsz   ({busy} was taken, so a free port)" in banner, banner


@pytest.mark.parametrize("flag", ["--port", "--monitor-port", "--api-port"])
def test_a_taken_port_gives_one_line_naming_it_and_its_flag(tmp_path: Path, flag: str):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--monitor-port": "0", "--api-port": "0", flag: str(busy)}
        result = subprocess.run(
            [*UP, *[arg for item in ports.items() for arg in item], "--data-dir", str(tmp_path / "data")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    output = result.stdout + result.stderr
    assert result.returncode == Exit.USAGE, output
    assert [line for line in output.splitlines() if str(busy) in line] == [
        f"error: port {busy} is already in use (another streamsched up or nats-server?); choose another with {flag}"
        + (" (0: none)" if flag == "--api-port" else "")
    ], output
    assert "Traceback" not in output
    assert not (tmp_path / "data").exists(), "nats-server was started anyway"


def test_nats_server_failing_to_start_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(PortInUse) as client:
            NatsServer(port=busy, store_dir=tmp_path / "a").start()
        with pytest.raises(PortInUse) as monitor:
            NatsServer(port=free_port(), monitor_port=busy, store_dir=tmp_path / "b").start()
        # Another process takes the port between the check and nats-server's bind: the
        # server exits, and the check made after that names the port.
        checks = iter([False])  # free at the check before the start, taken after
        monkeypatch.setattr(server_module, "port_in_use", lambda port, host: next(checks, True) if port == busy else False)
        with pytest.raises(PortInUse) as raced:
            NatsServer(port=free_port(), monitor_port=busy, store_dir=tmp_path / "c").start()
        monkeypatch.undo()
    assert (client.value.port, client.value.which) == (busy, "client")
    assert (monitor.value.port, monitor.value.which) == (busy, "monitor")
    assert (raced.value.port, raced.value.which) == (busy, "monitor")
    config = tmp_path / "bad.conf"
    config.write_text("listen: {{{\n")
    with pytest.raises(ServerStartError, match=r"nats-server did not start: .*[Pp]arse error"):
        NatsServer(port=free_port(), config=config, store_dir=tmp_path / "d").start()
