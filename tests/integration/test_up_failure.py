"""A `make up` that fails stops what it started (issue 20).

The issue's reproduction: with an invalid risk rules file, risk refuses to start with one clear
line and `make up` exits 2 — and the issuer, transfer-engine and gateway it had started were left
running.  Here `make up MODE=native` runs on a private home (``services.stack.sandbox``'s
settings: a temp dir, free ports) with such a rules file, and afterwards no process of that home
runs, no pid file is left, no port of the stack answers and ``status`` reports everything
stopped.  A process that ran before that `make up` (the issuer) is left running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from services.common.discovery.registry import FileRegistry
from services.issuer.adapters.upstream.disk import init_root_ca
from services.issuer.harness import accepts_connections
from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, sandbox_settings
from tests.support.helpers import clean_environment, scrub_environment, wait_until

pytestmark = pytest.mark.integration

MAKE_TIMEOUT = 120.0
ISSUER_TIMEOUT = 20.0
INVALID_RULES = '{"currency": "CNY", "review_threshold": '  # cut short: not JSON


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[NativeStack]:
    """A native stack whose risk rules are invalid; always down and removed afterwards."""
    if shutil.which("make") is None:
        pytest.skip("runs `make up`, and make is not installed")
    scrub_environment(monkeypatch)  # what the test itself starts inherits this environment
    root = Path(tempfile.mkdtemp(prefix="ztu", dir="/tmp"))  # short: unix socket paths
    try:
        rules = root / "rules.json"
        rules.write_text(INVALID_RULES)
        native = NativeStack(sandbox_settings(root, risk_rules=rules))
        try:
            yield native
        finally:
            native.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_up(native: NativeStack) -> subprocess.CompletedProcess[str]:
    """`make up MODE=native` in this checkout, as an operator would run it, on ``native``'s home
    (its ZTBANK_* settings) with the venv running these tests, which make does not reinstall."""
    venv = Path(sys.executable).parents[1]
    command = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "up", f"VENV={venv}"]
    return subprocess.run(
        [*command, "-o", str(venv / ".installed"), "MODE=native"],
        env=clean_environment() | native.env,
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT,
        check=False,
    )


def processes_of(native: NativeStack) -> list[int]:
    """Every process started with this stack's ZTBANK_HOME (ours to see: we run as its user)."""
    marker = f"ZTBANK_HOME={native.settings.home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if marker in environ and state != "Z":
            found.append(int(proc.name))
    return found


def answering_ports(native: NativeStack) -> list[str]:
    """The stack's registered addresses where something accepts a connection."""
    answering = []
    for address in FileRegistry(native.settings.registry).services().values():
        try:
            socket.create_connection((address.host, address.port), timeout=2).close()
        except OSError:
            continue
        answering.append(address.target)
    return answering


def assert_refused_with_risks_line(
    native: NativeStack, up: subprocess.CompletedProcess[str]
) -> None:
    """Exit 2; stderr names the failing service with its log, and carries risk's one line."""
    transcript = f"stdout:\n{up.stdout}\nstderr:\n{up.stderr}"
    assert up.returncode == 2, transcript
    assert "Traceback" not in up.stdout + up.stderr, transcript
    log = native.services["risk"].log_file
    lines = up.stderr.splitlines()
    assert f"ztbank: risk exited during start-up; last lines of {log}:" in lines, transcript
    [cause] = [line for line in lines if "cannot start" in line]
    assert cause.startswith(
        f"risk: cannot start: invalid risk rules in {native.settings.risk_rules}: "
    ), transcript
    assert cause.endswith("the risk service cannot start without valid rules (ZTBANK_RISK_RULES)")


def test_a_failed_make_up_leaves_nothing_running(stack: NativeStack) -> None:
    up = make_up(stack)

    assert_refused_with_risks_line(stack, up)
    left = processes_of(stack)
    assert not left, f"left running after a failed `make up`: {left}\n{up.stderr}"
    for process in (stack.issuer, *stack.services.values()):
        assert not process.pid_file.exists(), f"{process.pid_file} left behind"
    assert not answering_ports(stack)
    status = stack.status()
    assert not status.issuer_running
    assert not any(probe.healthy for probe in status.services.values()), status.services


def test_a_failed_make_up_leaves_what_ran_before_it_running(stack: NativeStack) -> None:
    init_root_ca(stack.settings.certs_dir, stack.settings.trust_domain)
    stack.issuer.start(stack.env)
    wait_until(
        partial(accepts_connections, stack.settings.admin_socket),
        timeout=ISSUER_TIMEOUT,
        message=lambda: f"the issuer does not answer:\n{stack.issuer.log_tail()}",
    )
    issuer_pid = stack.issuer.pid()

    up = make_up(stack)

    assert_refused_with_risks_line(stack, up)
    assert issuer_pid is not None
    assert stack.issuer.pid() == issuer_pid, "the issuer that ran before `make up` was stopped"
    assert processes_of(stack) == [issuer_pid], up.stderr
    for process in stack.services.values():
        assert not process.pid_file.exists(), f"{process.pid_file} left behind"
