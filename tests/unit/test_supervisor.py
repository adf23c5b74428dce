"""The restart backoff and crash-loop rule of `streamsched up`, on a clock the test moves."""

from __future__ import annotations

import logging
import signal
import subprocess
import time

import psutil
import pytest

from streamsched.supervisor import RestartPolicy, Role, RoleProcess, Supervisor, describe_exit

POLICY = RestartPolicy(delay_s=0.5, max_delay_s=3.0, stable_after_s=30.0, crash_loop_exits=5, crash_loop_window_s=60.0)


def exiting_role(policy: RestartPolicy = POLICY) -> RoleProcess:
    """A role whose process exits at once with code 3."""
    return RoleProcess(Role("worker default#1", ["sh", "-c", "exit 3"], stop_stage=0), {"PATH": "/usr/bin:/bin"}, policy)


def exit_at(role: RoleProcess, now: float) -> float | None:
    """Let the current process exit, have the role notice at ``now``; its restart delay (None: crash-looping)."""
    assert role.process is not None
    role.process.wait()
    if not role.check(now):
        return None
    assert role.restart_at is not None
    return role.restart_at - now


def restart_at(role: RoleProcess, now: float) -> None:
    assert role.check(now) and role.process is not None


def test_the_restart_delay_doubles_up_to_its_cap_and_resets_after_a_stable_run(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="streamsched.up")
    role = exiting_role(RestartPolicy(delay_s=0.5, max_delay_s=3.0, crash_loop_exits=100))
    role.start(0.0)
    delays = []
    now = 0.0
    for _ in range(5):
        delay = exit_at(role, now)
        assert delay is not None
        delays.append(delay)
        assert role.check(now + delay - 0.01) and role.process is None, "restarted before its delay"
        now += delay
        restart_at(role, now)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert exit_at(role, now + POLICY.stable_after_s) == 0.5
    assert "worker default#1 exited with exit code 3 after 0.0 s up; restarting it in 0.5 s" in caplog.messages


def test_five_exits_within_the_window_are_a_crash_loop_but_spread_out_they_are_not():
    looping = exiting_role()
    looping.start(0.0)
    delays = []
    now = 0.0
    while (delay := exit_at(looping, now)) is not None:
        delays.append(delay)
        now += delay
        restart_at(looping, now)
    assert delays == [0.5, 1.0, 2.0, 3.0], "the fifth exit within 60 s is a crash loop"
    assert looping.process is None and looping.restart_at is None, "a crash-looping role is not restarted"
    assert [how for _, how in looping.exits] == ["exit code 3"] * 5

    spread = exiting_role()
    spread.start(0.0)
    for now in (0.0, 20.0, 40.0, 60.0, 80.0, 100.0):  # never 5 within 60 s
        delay = exit_at(spread, now)
        assert delay is not None
        restart_at(spread, now + delay)
    assert exit_at(spread, 120.0) is not None


def test_a_clean_exit_a_drained_worker_is_restarted_after_the_first_delay_and_is_no_crash():
    drained = RoleProcess(Role("worker default#1", ["sh", "-c", "exit 0"], stop_stage=0), {"PATH": "/usr/bin:/bin"}, POLICY)
    drained.start(0.0)
    now = 0.0
    for _ in range(POLICY.crash_loop_exits * 2):  # twice as many as a crash loop, within the window
        delay = exit_at(drained, now)
        assert delay == POLICY.delay_s
        now += delay
        restart_at(drained, now)
    assert drained.exits == []
    assert drained.process is not None
    drained.process.wait()


def test_exits_are_described_by_signal_name_or_exit_code():
    assert describe_exit(-9) == "SIGKILL"
    assert describe_exit(-15) == "SIGTERM"
    assert describe_exit(1) == "exit code 1"


def check_until_gone(role: RoleProcess, now: float, timeout_s: float = 10.0) -> None:
    """Check the retired role at ``now`` until it has exited (the process runs in real time)."""
    deadline = time.monotonic() + timeout_s
    while not role.gone:
        assert time.monotonic() < deadline, "the retired process did not exit"
        assert role.check(now)
        time.sleep(0.01)


def wait_trapped(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Until the shell below has set its trap: it runs ``sleep`` (as a child, or exec'd)."""
    shell = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout_s
    while not (shell.children() or shell.cmdline()[:1] == ["sleep"]):
        assert time.monotonic() < deadline, "the shell did not start"
        time.sleep(0.01)


#: Exits 0 on SIGTERM, as a worker does once drained.
DRAINS_ON_SIGTERM = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.05; done"]
#: Ignores SIGTERM (inherited by the exec'd sleep).
IGNORES_SIGTERM = ["sh", "-c", "trap '' TERM; exec sleep 60"]


def test_a_retired_role_that_exits_cleanly_is_forgotten_and_not_restarted(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="streamsched.up")
    supervisor = Supervisor([], {"PATH": "/usr/bin:/bin"}, POLICY)
    kept = supervisor.add(Role("worker default#1", DRAINS_ON_SIGTERM, stop_stage=0))
    retired = supervisor.add(Role("worker default#2", DRAINS_ON_SIGTERM, stop_stage=0))
    assert retired.process is not None
    wait_trapped(retired.process)
    pid = retired.retire(time.monotonic(), drain_s=30.0, term_s=10.0)
    assert pid == retired.process.pid
    retired.terminate()  # what the autoscaler does when the drain request finds nobody
    check_until_gone(retired, time.monotonic())
    assert retired.process is None and retired.restart_at is None, "a retired role is not restarted"
    assert supervisor.check() is None
    assert supervisor.processes == [kept]
    assert kept.process is not None and kept.process.poll() is None
    assert "worker default#2 retired: exited cleanly after" in caplog.text
    assert "starting it again" not in caplog.text and "restart" not in caplog.text
    supervisor.stop(5.0, lambda: False)
    assert kept.process.poll() == 0


def test_a_retired_role_gets_sigterm_after_the_drain_time_and_sigkill_only_when_it_ignores_that():
    role = RoleProcess(Role("worker default#3", IGNORES_SIGTERM, stop_stage=0), {"PATH": "/usr/bin:/bin"}, POLICY)
    process = role.start(0.0)
    wait_trapped(process)
    assert role.retire(100.0, drain_s=5.0, term_s=5.0) == process.pid
    assert role.check(104.9) and process.poll() is None
    assert role.retirement is not None and not role.retirement.termed
    assert role.check(105.0) and role.retirement is not None and role.retirement.termed
    assert role.check(109.9) and process.poll() is None, "SIGTERM is ignored: it still runs, and is not killed yet"
    assert role.check(110.0)
    assert process.returncode == -signal.SIGKILL
    check_until_gone(role, 110.1)


def test_a_retired_role_that_exits_on_sigterm_is_not_killed():
    role = RoleProcess(Role("worker default#2", DRAINS_ON_SIGTERM, stop_stage=0), {"PATH": "/usr/bin:/bin"}, POLICY)
    process = role.start(0.0)
    wait_trapped(process)
    role.retire(0.0, drain_s=1.0, term_s=60.0)
    assert role.check(1.0)  # SIGTERM
    check_until_gone(role, 2.0)
    assert process.returncode == 0


def test_a_role_retired_while_it_waits_to_be_restarted_is_gone_at_once():
    role = exiting_role()
    role.start(0.0)
    assert exit_at(role, 0.0) == POLICY.delay_s
    assert role.retire(0.1, drain_s=1.0, term_s=1.0) is None
    assert role.gone and role.check(10.0) and role.process is None
