"""One lab at a time across the CLI and the console, on a real stack (issue 21, item 4).

A private native stack (``services.stack.sandbox``, 20 s SVIDs) and ``ztbank console`` for it,
as an operator starts them.  While a lab of the CLI holds the stack's lab lock (held here, in
the test process, as ``ztbank lab`` holds it), the console refuses to start one: 409 naming
that lab, nothing started.  Once it is free, the console starts the real ``ztbank lab policy``,
hands it the lock, and the lab passes; afterwards the lock is free again, and ``make down``
(``ztbank down``) stops the console with the stack.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.labs.support import LabLock
from services.stack.native import NativeStack, console_process
from services.stack.sandbox import free_port, sandbox_stack
from tests.e2e.conftest import SVID_TTL
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import clean_environment, scrub_environment, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        E2ETargetSettings().stack == "existing",
        reason="starts a stack and a console of its own; not a suite for an existing stack",
    ),
]

CONSOLE_TIMEOUT = 60.0  # deadlines for evidence, not timing claims
LAB_TIMEOUT = 150.0
START = {"x-ztbank-console": "start"}


class Console:
    def __init__(self, native: NativeStack, log: Path) -> None:
        self.native = native
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).with_name("ztbank")), "console"],
                env=clean_environment() | native.env | {"ZTBANK_CONSOLE_PORT": str(self.port)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.base}{path}", timeout=10) as reply:
                body: dict[str, Any] = json.load(reply)
                return body
        except OSError:
            return None

    def start_lab(self, name: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.base}/api/labs/{name}", method="POST", headers=START
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.load(reply)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def lab(self, *, ended: bool) -> dict[str, Any] | None:
        state = self.get("/api/state")
        lab: dict[str, Any] | None = state["lab"] if state else None
        if lab is None or (ended and lab["verdict"] is None):
            return None
        return lab


@pytest.fixture(scope="module")
def native() -> Iterator[NativeStack]:
    env = pytest.MonkeyPatch()
    try:
        scrub_environment(env)  # the stack's processes inherit this process's environment
        with sandbox_stack(svid_ttl=SVID_TTL) as stack:
            yield stack
    finally:
        env.undo()


@pytest.fixture(scope="module")
def console(native: NativeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    served = Console(native, tmp_path_factory.mktemp("console") / "console.log")
    try:
        wait_until(
            lambda: (state := served.get("/api/state")) and state["state"]["up"],
            timeout=CONSOLE_TIMEOUT,
            message=lambda: f"the console never saw the stack up:\n{served.output()}",
        )
        yield served
    finally:
        if served.process.poll() is None:
            served.process.terminate()
        served.process.wait(CONSOLE_TIMEOUT)


def test_a_lab_of_the_cli_refuses_a_lab_from_the_console(
    native: NativeStack, console: Console
) -> None:
    with LabLock.take(native.settings, "outage", "cli"):
        status, body = console.start_lab("policy")
    assert status == 409, body
    assert body["detail"].startswith("lab 'outage' is running (since ")
    assert body["detail"].endswith(", started from the CLI): one lab at a time")
    assert console.lab(ended=False) is None  # nothing started
    labs = console.get("/api/labs")
    assert labs is not None
    assert labs["running"] is False


def test_the_console_hands_the_lock_to_the_lab_it_starts(
    native: NativeStack, console: Console
) -> None:
    status, body = console.start_lab("policy")
    assert status == 202, body

    lab = wait_until(
        lambda: console.lab(ended=True),
        timeout=LAB_TIMEOUT,
        message=lambda: f"the lab did not end: {console.lab(ended=False)}\n{console.output()}",
    )

    # The lab took the lock it was handed (else it would have refused itself, in one line).
    assert lab["verdict"] == "passed", "\n".join(lab["lines"])
    assert lab["lines"][0].startswith("lab policy: ")
    with LabLock.take(native.settings, "expiry", "cli"):  # free again
        pass


def test_down_stops_the_console_with_the_stack(native: NativeStack, console: Console) -> None:
    pid_file = console_process(native.settings, console.port).pid_file
    assert pid_file.read_text() == f"{console.process.pid}\n"

    stopped = native.down()

    assert stopped[0] == f"console on port {console.port}"
    assert console.process.wait(CONSOLE_TIMEOUT) == 0, console.output()
    assert not pid_file.exists()
    assert console.get("/api/labs") is None
