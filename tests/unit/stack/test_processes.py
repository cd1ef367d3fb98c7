"""Background processes tracked by pid files: start, detect, stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.stack import processes
from services.stack.processes import ManagedProcess
from tests.support.sleeper import IGNORE_SIGTERM_ENV, READY

REPO_ROOT = Path(__file__).resolve().parents[3]
SLEEPER = "tests.support.sleeper"
ENV = {"PYTHONPATH": str(REPO_ROOT)}
WAIT = 20.0  # a deadline for evidence, not a timing claim: a busy machine starts Python slowly


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Started:
    """Every pid a test started, SIGKILLed and reaped afterwards whatever happened."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def start(self, process: ManagedProcess, env: dict[str, str] | None = None) -> int:
        pid = process.start({**ENV, **(env or {})})
        self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def started() -> Iterator[Started]:
    tracker = Started()
    yield tracker
    tracker.cleanup()


@pytest.fixture
def sleeper(tmp_path: Path) -> ManagedProcess:
    return ManagedProcess("sleeper", SLEEPER, tmp_path / "run", tmp_path / "logs")


def wait_ready(process: ManagedProcess) -> None:
    wait_for(lambda: READY in process.log_tail(), "the child to report ready")


def test_start_writes_pid_file_and_runs_the_module(
    sleeper: ManagedProcess, started: Started
) -> None:
    pid = started.start(sleeper)
    assert sleeper.pid_file == sleeper.pid_dir / "sleeper.pid"
    assert sleeper.pid_file.read_text().strip() == str(pid)
    assert sleeper.running()
    assert sleeper.pid() == pid
    assert not sleeper.exited()
    wait_ready(sleeper)
    assert sleeper.log_file == sleeper.log_dir / "sleeper.log"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:3] == [sys.executable.encode(), b"-m", SLEEPER.encode()]
    # Detached: its own session, so the terminal's hangup does not reach it.
    assert os.getsid(pid) == pid


def test_stop_terminates_and_removes_the_pid_file(
    sleeper: ManagedProcess, started: Started
) -> None:
    pid = started.start(sleeper)
    wait_ready(sleeper)
    began = time.monotonic()
    assert sleeper.stop() is True
    assert time.monotonic() - began < processes.STOP_TIMEOUT / 2  # SIGTERM sufficed
    assert not alive(pid)
    assert not sleeper.pid_file.exists()
    assert not sleeper.running()
    assert sleeper.exited()
    assert sleeper.stop() is False  # nothing left to stop


def test_stop_kills_a_child_that_ignores_sigterm(
    sleeper: ManagedProcess, started: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "STOP_TIMEOUT", 0.5)
    pid = started.start(sleeper, {IGNORE_SIGTERM_ENV: "1"})
    wait_ready(sleeper)
    os.kill(pid, signal.SIGTERM)  # proves the child really ignores it
    time.sleep(0.1)
    assert alive(pid)

    result: list[bool] = []
    began = time.monotonic()
    stopper = threading.Thread(target=lambda: result.append(sleeper.stop()), daemon=True)
    stopper.start()
    stopper.join(WAIT)
    elapsed = time.monotonic() - began
    if stopper.is_alive():
        started.cleanup()  # lets stop() return
        stopper.join(WAIT)
        pytest.fail("stop() did not end a child that ignores SIGTERM")
    assert result == [True]
    assert 0.5 <= elapsed < 3.0
    assert not alive(pid)
    assert not sleeper.pid_file.exists()


def test_stale_pid_file_of_an_unrelated_process_is_not_running(
    sleeper: ManagedProcess,
) -> None:
    sleeper.pid_dir.mkdir(parents=True)
    sleeper.pid_file.write_text(f"{os.getpid()}\n")  # alive, but not the sleeper
    assert sleeper.pid() is None
    assert not sleeper.running()
    assert sleeper.exited()
    assert sleeper.stop() is False  # and above all: it did not signal us
    assert not sleeper.pid_file.exists()


def test_pid_file_of_a_dead_process_is_not_running(sleeper: ManagedProcess) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleeper.pid_dir.mkdir(parents=True)
    sleeper.pid_file.write_text(f"{gone.pid}\n")
    assert not sleeper.running()
    assert sleeper.stop() is False


@pytest.mark.parametrize("content", ["", "not-a-pid\n", "-1\n", "99999999999\n"])
def test_unreadable_pid_file_is_not_running(sleeper: ManagedProcess, content: str) -> None:
    sleeper.pid_dir.mkdir(parents=True)
    sleeper.pid_file.write_text(content)
    assert sleeper.pid() is None
    assert not sleeper.running()


def test_no_pid_file_is_not_running(sleeper: ManagedProcess) -> None:
    assert not sleeper.running()
    assert sleeper.exited()
    assert sleeper.stop() is False


def test_child_that_dies_is_reported_exited(sleeper: ManagedProcess, started: Started) -> None:
    pid = started.start(sleeper)
    wait_ready(sleeper)
    os.kill(pid, signal.SIGKILL)
    wait_for(sleeper.exited, "exited() to notice the death")
    assert not sleeper.running()
    assert sleeper.stop() is False
    assert not sleeper.pid_file.exists()


def test_module_that_fails_to_start(tmp_path: Path, started: Started) -> None:
    broken = ManagedProcess("broken", "tests.support.no_such_module", tmp_path, tmp_path)
    started.start(broken)
    wait_for(broken.exited, "the failed child to be seen as exited")
    assert not broken.running()
    assert "No module named tests.support.no_such_module" in broken.log_tail()


def test_log_is_appended_across_restarts(sleeper: ManagedProcess, started: Started) -> None:
    for run in (1, 2):
        started.start(sleeper)
        deadline = time.monotonic() + WAIT
        while sleeper.log_tail().count(READY) < run:
            assert time.monotonic() < deadline, f"run {run} never reported ready"
            time.sleep(0.01)
        sleeper.stop()
    assert sleeper.log_tail().count(READY) == 2
    assert sleeper.log_tail(lines=1) == READY


def test_environment_is_the_one_the_process_was_started_with(
    sleeper: ManagedProcess, started: Started
) -> None:
    assert sleeper.environment() is None  # not running
    started.start(sleeper, {"ZTBANK_SVID_TTL": "20s", "ZTBANK_LAB_MARK": "a=b"})
    environment = sleeper.environment()
    assert environment is not None
    assert environment["ZTBANK_SVID_TTL"] == "20s"
    assert environment["ZTBANK_LAB_MARK"] == "a=b"  # split at the first "=" only
