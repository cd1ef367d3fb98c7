"""The one lab lock (issue 21, item 4): ``ZTBANK_HOME/run/lab.lock``, held with flock by whatever
runs a lab, never waited for; the file names the lab holding it, its pid and since when; the
kernel releases it however its holder ends; the console hands it to the lab it starts."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.labs.errors import LabUsageError
from services.labs.support import (
    LAB_LOCK_FD,
    LabHolder,
    LabLock,
    LabRunningError,
    check_stack_running,
    read_lab_holder,
)
from services.stack.native import NativeStack, StackSettings
from services.stack.processes import ManagedProcess
from services.stack.sandbox import REPO_ROOT
from tests.support.helpers import wait_until
from tests.support.sleeper import READY

WAIT = 20.0  # a deadline for evidence, not a timing claim
HELD = "holds the lab lock"


def settings(tmp_path: Path) -> StackSettings:
    return StackSettings(home=tmp_path / "var", registry=REPO_ROOT / "infra" / "registry.json")


def since(holder: LabHolder) -> str:
    return time.strftime("%H:%M:%S", time.localtime(holder.since))


def test_a_lab_takes_the_lock_and_says_so_in_its_file(tmp_path: Path) -> None:
    with LabLock.take(settings(tmp_path), "outage", "cli") as lock:
        assert lock.path == tmp_path / "var" / "run" / "lab.lock"
        record = json.loads(lock.path.read_text())
        assert (record["lab"], record["pid"], record["by"]) == ("outage", os.getpid(), "cli")
        assert record["since"] <= time.time()
        assert lock.path.stat().st_mode & 0o777 == 0o644  # readable by another uid: no secret
    assert lock.path.read_text() == ""  # released: it names no lab any more


def test_a_second_lab_is_refused_at_once_naming_the_first(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    with LabLock.take(stack, "outage", "cli") as first:
        holder = read_lab_holder(first.fileno())
        assert holder == LabHolder("outage", os.getpid(), holder.since if holder else 0, "cli")
        assert holder is not None
        with pytest.raises(LabRunningError) as refused:
            LabLock.take(stack, "policy", "console")
        assert str(refused.value) == (
            f"lab 'outage' is running (since {since(holder)}, pid {os.getpid()},"
            " started from the CLI): one lab at a time"
        )
        assert isinstance(refused.value, LabUsageError)  # exit 2 from the CLI
        assert json.loads(first.path.read_text())["lab"] == "outage"  # the refusal changed nothing
    with LabLock.take(stack, "policy", "console") as second:
        assert json.loads(second.path.read_text())["by"] == "console"


def test_a_holder_that_has_not_said_who_it_is_is_still_refused(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    path = LabLock.file(stack)
    path.parent.mkdir(parents=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        with pytest.raises(LabRunningError) as refused:
            LabLock.take(stack, "policy", "cli")
    finally:
        os.close(descriptor)
    assert str(refused.value) == f"another lab is running (it holds {path}): one lab at a time"


def hold_in_child(stack: StackSettings) -> subprocess.Popen[str]:
    """A process that takes the lock for the rotation lab, says so, and waits to be killed."""
    script = (
        "import signal, sys\n"
        "from services.labs.support import LabLock\n"
        "from services.stack.native import StackSettings\n"
        f"lock = LabLock.take(StackSettings(home={str(stack.home)!r}), 'rotation', 'cli')\n"
        f"print({HELD!r}, flush=True)\n"
        "signal.pause()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == HELD
    return process


def test_a_lock_left_by_a_killed_lab_is_free(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    holder = hold_in_child(stack)
    try:
        with pytest.raises(LabRunningError, match=f"lab 'rotation' is running .*pid {holder.pid}"):
            LabLock.take(stack, "policy", "cli")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(WAIT)
    # No stale lock: the kernel released it with the process (the file still names it).
    assert json.loads(LabLock.file(stack).read_text())["lab"] == "rotation"
    with LabLock.take(stack, "policy", "cli"):
        assert json.loads(LabLock.file(stack).read_text())["lab"] == "policy"


def test_the_console_hands_its_lock_to_the_lab_it_starts(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    script = (
        "import os, json\n"
        "from services.labs.support import LAB_LOCK_FD, LabLock\n"
        "from services.stack.native import StackSettings\n"
        f"settings = StackSettings(home={str(stack.home)!r})\n"
        f"lock = LabLock.handed_over(settings, os.environ[{LAB_LOCK_FD!r}], 'revocation')\n"
        "record = json.loads(lock.path.read_text())\n"
        "print(json.dumps({'record': record, 'pid': os.getpid()}), flush=True)\n"
    )
    with LabLock.take(stack, "revocation", "console") as lock:
        child = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, LAB_LOCK_FD: str(lock.fileno())},
            pass_fds=(lock.fileno(),),
            capture_output=True,
            text=True,
            timeout=WAIT,
            cwd=REPO_ROOT,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        seen = json.loads(child.stdout)
        record, pid = seen["record"], seen["pid"]
        assert (record["lab"], record["pid"], record["by"]) == ("revocation", pid, "console")
        # Still held by the console after the lab's own end: released when the console says so.
        with pytest.raises(LabRunningError, match="lab 'revocation' is running"):
            LabLock.take(stack, "policy", "cli")


def test_a_descriptor_that_is_not_the_lab_lock_is_refused(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    with LabLock.take(stack, "breaker", "cli"):
        other = os.open(os.devnull, os.O_RDONLY)
        try:
            for text in (str(other), "not-a-number", "9999"):
                with pytest.raises(LabUsageError, match=f"{LAB_LOCK_FD}={text} is not a lab lock"):
                    LabLock.handed_over(stack, text, "breaker")
            # The lock's file, but not the console's open file: still refused, held elsewhere.
            own = os.open(LabLock.file(stack), os.O_RDONLY)
            try:
                with pytest.raises(LabRunningError, match="lab 'breaker' is running"):
                    LabLock.handed_over(stack, str(own), "breaker")
            finally:
                os.close(own)
        finally:
            os.close(other)


# -- a lab on a stopped stack ---------------------------------------------------------------------


def test_a_stopped_stack_is_named_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(LabUsageError) as refused:
        check_stack_running(settings(tmp_path))
    assert str(refused.value) == (
        f"no stack runs in ZTBANK_HOME={tmp_path / 'var'}: start it with `make up` in the"
        " checkout, or set ZTBANK_HOME to the home of a running stack"
    )


def test_a_stack_that_is_not_all_running_is_named_with_what_is_missing(tmp_path: Path) -> None:
    stack = settings(tmp_path)
    native = NativeStack(stack)
    # A stand-in the issuer's ManagedProcess takes for the issuer (its module in the argv).
    issuer = ManagedProcess(
        "issuer",
        "services.issuer",
        native.issuer.pid_dir,
        native.issuer.log_dir,
        argv=(sys.executable, "-m", "tests.support.sleeper", "services.issuer"),
    )
    pid = issuer.start({"PYTHONPATH": str(REPO_ROOT)})
    try:
        wait_until(lambda: READY in issuer.log_tail(), timeout=WAIT, message="no stand-in")
        assert native.issuer.running()
        with pytest.raises(LabUsageError) as refused:
            check_stack_running(stack)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert str(refused.value) == (
        f"the stack in ZTBANK_HOME={stack.home} is not all running (risk, transfer-engine,"
        " gateway stopped): `make up` starts what is missing"
    )


def test_beside_the_compose_stack_the_lab_finds_out_itself(tmp_path: Path) -> None:
    check_stack_running(StackSettings(home=tmp_path / "var", stack_kind="compose"))
