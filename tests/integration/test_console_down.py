"""`make down` stops the console too (issue 21, item 8).

The README says `make down` stops every process; a `make console` kept running.  Here
``ztbank console`` serves a private home (``services.stack.sandbox``'s settings, a free port; no
stack needs to run for the console to serve its page), then ``make down MODE=native`` on that
home stops it: SIGTERM, a normal end (exit 0, its pid file gone), and its port no longer
answers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.stack.native import NativeStack, console_process
from services.stack.sandbox import REPO_ROOT, free_port, sandbox_settings
from tests.support.helpers import clean_environment, scrub_environment, wait_until

pytestmark = pytest.mark.integration

MAKE_TIMEOUT = 120.0
CONSOLE_TIMEOUT = 60.0  # a deadline for evidence: a busy machine starts the console slowly


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@pytest.fixture
def home() -> Iterator[NativeStack]:
    if shutil.which("make") is None:
        pytest.skip("runs `make down`, and make is not installed")
    env = pytest.MonkeyPatch()
    scrub_environment(env)
    root = Path(tempfile.mkdtemp(prefix="ztc", dir="/tmp"))
    try:
        yield NativeStack(sandbox_settings(root))
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def test_make_down_stops_the_console(home: NativeStack, tmp_path: Path) -> None:
    port = free_port()
    env = clean_environment() | home.env | {"ZTBANK_CONSOLE_PORT": str(port)}
    log = tmp_path / "console.log"
    with log.open("wb") as out:
        console = subprocess.Popen(
            [str(Path(sys.executable).with_name("ztbank")), "console"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pid_file = console_process(home.settings, port).pid_file
    try:
        wait_until(
            lambda: answers(f"http://127.0.0.1:{port}/api/labs") and pid_file.is_file(),
            timeout=CONSOLE_TIMEOUT,
            message=lambda: f"the console did not serve:\n{log.read_text(errors='replace')}",
        )
        assert pid_file.read_text() == f"{console.pid}\n"

        venv = Path(sys.executable).parents[1]
        # MODE=native: the native stack's `down` only (no Docker is asked about a compose one).
        make = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "down", f"VENV={venv}"]
        down = subprocess.run(
            [*make, "-o", str(venv / ".installed"), "MODE=native"],
            env=env,
            capture_output=True,
            text=True,
            timeout=MAKE_TIMEOUT,
            check=False,
        )

        assert down.returncode == 0, f"stdout:\n{down.stdout}\nstderr:\n{down.stderr}"
        assert down.stdout == f"stopped: console on port {port}\n"
        # `down` returns once the console is gone: it has ended already.
        assert console.poll() is not None
    finally:
        if console.poll() is None:
            console.kill()
        console.wait(CONSOLE_TIMEOUT)
    output = log.read_text(errors="replace")
    assert console.returncode == 0, output
    assert output.splitlines()[-1] == "lab console stopped", output
    assert "Traceback" not in output, output
    assert not pid_file.exists()
    assert not answers(f"http://127.0.0.1:{port}/api/labs")
