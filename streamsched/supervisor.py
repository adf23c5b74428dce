"""Keeps the role processes of ``streamsched up`` running, for a laptop or a demo.

Deliberately small: a role that exits is started again with the same command and
environment after a capped, doubling delay; a role that keeps failing stops the whole
thing; stopping goes in stages. A clean exit (code 0) is a worker drained by
``streamsched workers drain`` (roles exit 0 on their own only when told to stop): it is
restarted after the first delay, as a graceful restart, and not counted as a failure.
A role can also be added while running and *retired* (``up --autoscale`` does both with
workers): a retired role is drained by whoever retired it, gets SIGTERM when the drain has
not ended it in time and SIGKILL only when it outlives SIGTERM too, and is not restarted
when it exits. Production runs each role on its own under whatever already restarts
processes there (systemd, Kubernetes), so nothing more belongs here.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("streamsched.up")

#: Delay before the first restart of a role that exited; it doubles with every exit after
#: that (0.5, 1, 2, 4 ... s), so a broken role does not spin a core.
RESTART_DELAY_S = 0.5
#: The doubling stops here: a role that keeps dying is tried again at least this often.
RESTART_DELAY_MAX_S = 15.0
#: A role that stayed up this long was healthy: its next exit restarts it after
#: :data:`RESTART_DELAY_S` again instead of the doubled delay.
STABLE_AFTER_S = 30.0
#: A role that fails (exits non-zero or by a signal) this many times within :data:`CRASH_LOOP_WINDOW_S` is crash-looping
#: (it fails at start, say an import error): restarting it cannot help, so ``up`` stops.
CRASH_LOOP_EXITS = 5
#: The window over which :data:`CRASH_LOOP_EXITS` are counted.
CRASH_LOOP_WINDOW_S = 60.0


@dataclass(frozen=True)
class RestartPolicy:
    """When a role that exited is started again, and when ``up`` gives up on it."""

    delay_s: float = RESTART_DELAY_S
    """Delay before the first restart; doubles with each exit."""
    max_delay_s: float = RESTART_DELAY_MAX_S
    """Cap of the doubling delay."""
    stable_after_s: float = STABLE_AFTER_S
    """Uptime after which an exit counts as the first again (the delay resets)."""
    crash_loop_exits: int = CRASH_LOOP_EXITS
    """Failures (exits but clean ones) within ``crash_loop_window_s`` that make a role crash-looping."""
    crash_loop_window_s: float = CRASH_LOOP_WINDOW_S
    """Window over which exits are counted."""


@dataclass(frozen=True)
class Role:
    """One role process to keep running."""

    name: str
    """How log lines name it: ``master``, ``regional default``, ``worker default#1``."""
    command: list[str]
    stop_stage: int
    """Roles stop in stages, lowest first; a stage is done before the next one gets SIGTERM."""


def describe_exit(returncode: int) -> str:
    """``SIGKILL`` for a process killed by a signal, ``exit code 1`` for one that exited."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Retirement:
    """A role on its way out: it is not restarted, and is signalled if it lingers."""

    since: float
    term_at: float
    """SIGTERM if it still runs then (the drain did not end it)."""
    kill_at: float
    """SIGKILL if it still runs then: it ignores SIGTERM."""
    termed: bool = False


@dataclass
class RoleProcess:
    """A role's current process (``None`` while it waits to be restarted) and its recent exits."""

    role: Role
    env: Mapping[str, str]
    policy: RestartPolicy
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    next_delay_s: float = 0.0
    exits: list[tuple[float, str]] = field(default_factory=list)
    """(when, how) of the failures within the crash-loop window, oldest first."""
    retirement: Retirement | None = None
    gone: bool = False
    """Retired and exited: the supervisor forgets it."""

    def start(self, now: float) -> subprocess.Popen[bytes]:
        # Its own process group: a terminal's Ctrl-C goes to the foreground group only, so
        # it reaches ``up`` alone, which then stops the roles in order.
        self.process = subprocess.Popen(self.role.command, env=dict(self.env), process_group=0)
        self.started_at = now
        self.restart_at = None
        return self.process

    def check(self, now: float) -> bool:
        """Notice an exit and schedule the restart, or restart when due. False: crash-looping."""
        if self.retirement is not None:
            self._check_retiring(now, self.retirement)
            return True
        if self.process is None:
            if self.restart_at is not None and now >= self.restart_at:
                log.info("%s restarted (pid %d)", self.role.name, self.start(now).pid)
            return True
        returncode = self.process.poll()
        if returncode is None:
            return True
        how = describe_exit(returncode)
        uptime = now - self.started_at
        self.process = None
        clean = returncode == 0  # drained (`workers drain`): restarted, no failure
        if not clean:
            self.exits = [(t, h) for t, h in self.exits if now - t < self.policy.crash_loop_window_s] + [(now, how)]
            if len(self.exits) >= self.policy.crash_loop_exits:
                return False
        if clean or uptime >= self.policy.stable_after_s or not self.next_delay_s:
            self.next_delay_s = self.policy.delay_s
        self.restart_at = now + self.next_delay_s
        if clean:
            log.info("%s exited cleanly after %.1f s up (drained); starting it again in %.1f s", self.role.name, uptime, self.next_delay_s)
        else:
            log.warning("%s exited with %s after %.1f s up; restarting it in %.1f s", self.role.name, how, uptime, self.next_delay_s)
        self.next_delay_s = min(self.next_delay_s * 2, self.policy.max_delay_s)
        return True

    def retire(self, now: float, drain_s: float, term_s: float) -> int | None:
        """Stop restarting it; SIGTERM after ``drain_s`` if it still runs, SIGKILL ``term_s``
        after that. The pid to drain, or None when it is not running (it is gone at once)."""
        self.retirement = Retirement(since=now, term_at=now + drain_s, kill_at=now + drain_s + term_s)
        if self.process is None:
            self.gone = True
            return None
        return self.process.pid

    def terminate(self) -> None:
        """SIGTERM a retiring role now (asking it to drain failed; a worker drains on SIGTERM too)."""
        if self.retirement is not None and self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.retirement.termed = True

    def _check_retiring(self, now: float, retirement: Retirement) -> None:
        process = self.process
        if process is None:
            self.gone = True
            return
        returncode = process.poll()
        if returncode is not None:
            self.process = None
            self.gone = True
            if returncode == 0:
                log.info("%s retired: exited cleanly after %.1f s up", self.role.name, now - self.started_at)
            else:
                log.warning("%s retired: exited with %s", self.role.name, describe_exit(returncode))
        elif now >= retirement.kill_at:
            log.warning("%s still running %.0f s after it was retired, SIGTERM included; killing it", self.role.name, now - retirement.since)
            process.kill()
            process.wait()
        elif now >= retirement.term_at and not retirement.termed:
            log.warning("%s still running %.0f s after it was asked to drain; sending SIGTERM", self.role.name, retirement.term_at - retirement.since)
            self.terminate()


class Supervisor:
    """Starts the roles, restarts those that exit, stops them all in stages."""

    def __init__(self, roles: Sequence[Role], env: Mapping[str, str], policy: RestartPolicy) -> None:
        self.env = env
        self.policy = policy
        self.processes = [RoleProcess(role, env, policy) for role in roles]

    def start(self) -> None:
        now = time.monotonic()
        for process in self.processes:
            process.start(now)

    def add(self, role: Role) -> RoleProcess:
        """Start one more role process, kept running like the others."""
        process = RoleProcess(role, self.env, self.policy)
        log.info("%s started (pid %d)", role.name, process.start(time.monotonic()).pid)
        self.processes.append(process)
        return process

    def check(self) -> RoleProcess | None:
        """Restart what is due, forget retired roles that exited; the first crash-looping
        role, if any (it is not restarted)."""
        now = time.monotonic()
        for process in self.processes:
            if not process.check(now):
                return process
        if any(process.gone for process in self.processes):
            self.processes = [process for process in self.processes if not process.gone]
        return None

    def stop(self, timeout_s: float, hurry: Callable[[], bool]) -> None:
        """Stop every stage in turn (SIGTERM, then SIGKILL after ``timeout_s`` or when ``hurry()``)."""
        for stage in sorted({p.role.stop_stage for p in self.processes}):
            running = {p.role.name: p.process for p in self.processes if p.role.stop_stage == stage and p.process is not None}
            if running:
                log.info("stopping %s", ", ".join(running))
                stop_processes(list(running.values()), timeout_s, hurry)


def stop_processes(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float, hurry: Callable[[], bool]) -> None:
    """SIGTERM them all, wait up to ``timeout_s`` (polling, so a signal handler can set ``hurry``), SIGKILL the rest."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
