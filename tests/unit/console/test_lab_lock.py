"""The console and the CLI share the stack's one lab lock (issue 21, item 4): a lab of the CLI
refuses a lab from the page (409, audited, nothing started) and a lab from the page refuses one
of the CLI; the lab the console starts is handed the lock, which is free again once it ends."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.cli import main as cli
from services.common.authz.audit import AuditLog
from services.common.identity.source import SvidMaterial
from services.console.app import ACTION_HEADER, Console, create_console_app
from services.console.settings import ConsoleSettings
from services.labs.support import LAB_LOCK_FD, LabLock
from tests.support.helpers import one_line, wait_until
from tests.support.mtls_servers import new_authority
from tests.unit.console.test_app import CONSOLE_ID, FakeStack, assert_problem, audit_records

START = {ACTION_HEADER: "start"}
WAIT = 20.0  # a deadline for evidence, not a timing claim
# The lab the console starts: it takes the lock it was handed (at once: it shares the console's
# open file), says so, and runs until told to end (a file appears) or killed.
LAB = (
    "import fcntl, os, sys, time\n"
    f"descriptor = int(os.environ[{LAB_LOCK_FD!r}])\n"
    "fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "print('lab holds the lock', flush=True)\n"
    "while not os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.05)\n"
    "print('lab passed', flush=True)\n"
)


@pytest.fixture
def settings(tmp_path: Path) -> ConsoleSettings:
    return ConsoleSettings(home=tmp_path / "var", console_port=8190)


@pytest.fixture
def stack() -> FakeStack:
    identity: SvidMaterial = new_authority("console test").svid(CONSOLE_ID)
    return FakeStack(identity)


@pytest.fixture
def end_file(tmp_path: Path) -> Path:
    return tmp_path / "end-the-lab"


@pytest.fixture
def client(settings: ConsoleSettings, stack: FakeStack, end_file: Path) -> Iterator[TestClient]:
    def lab_command(name: str) -> Sequence[str]:
        return [sys.executable, "-c", LAB, str(end_file)]

    audit = AuditLog(settings.home / "audit" / "console.jsonl", fsync=False)
    console = Console(
        settings,
        stack,
        audit,
        {"revocation": "revoke a client", "rotation": "watch rotation"},
        {},
        lab_command=lab_command,
    )
    with TestClient(create_console_app(console), base_url="http://127.0.0.1:8190") as test:
        yield test
    audit.close()


def lab_state(client: TestClient) -> dict[str, Any] | None:
    lab: dict[str, Any] | None = client.get("/api/state").json()["lab"]
    return lab


def test_a_lab_of_the_cli_refuses_a_lab_from_the_page(
    client: TestClient, settings: ConsoleSettings
) -> None:
    with LabLock.take(settings, "outage", "cli") as held:
        since = json.loads(held.path.read_text())["since"]
        reply = client.post("/api/labs/revocation", headers=START)

        assert_problem(reply, 409, "lab 'outage' is running (since ")
        detail = reply.json()["detail"]
        assert detail.endswith(f", pid {os.getpid()}, started from the CLI): one lab at a time")
        assert json.loads(held.path.read_text())["since"] == since  # the lock is untouched
    assert client.get("/api/labs").json()["running"] is False
    assert lab_state(client) is None  # nothing started
    [record] = audit_records(settings)
    assert (record["decision"], record["reason"]) == ("deny", detail)


def test_a_lab_from_the_page_refuses_a_lab_of_the_cli_until_it_ends(
    client: TestClient,
    settings: ConsoleSettings,
    end_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert client.post("/api/labs/revocation", headers=START).status_code == 202
    wait_until(
        lambda: (lab := lab_state(client)) and "lab holds the lock" in lab["lines"],
        timeout=WAIT,
        message=lambda: f"the lab did not take the lock it was handed: {lab_state(client)}",
    )
    lab = lab_state(client)
    assert lab is not None
    record = json.loads(LabLock.file(settings).read_text())
    assert (record["lab"], record["by"]) == ("revocation", "console")
    monkeypatch.setenv("ZTBANK_HOME", str(settings.home))

    code = cli.main(["lab", "policy"])

    err = capsys.readouterr().err
    assert code == 2
    assert one_line(err).startswith("ztbank: lab 'revocation' is running (since ")
    assert err.endswith(", started from the console): one lab at a time\n")

    end_file.touch()
    wait_until(
        lambda: (lab := lab_state(client)) and lab["verdict"] == "passed",
        timeout=WAIT,
        message=lambda: f"the lab did not end: {lab_state(client)}",
    )
    with LabLock.take(settings, "policy", "cli"):  # free again
        pass


def test_a_refused_start_leaves_the_lock_free(
    client: TestClient, stack: FakeStack, settings: ConsoleSettings
) -> None:
    stack.up = False
    assert_problem(client.post("/api/labs/revocation", headers=START), 503, "the stack is down")
    with LabLock.take(settings, "policy", "cli"):
        pass
