"""`make up` never silently ignores a setting (issue 21, item 3), and `make down` stops the
console too (item 8).

``up`` records the durations the issuer runs with beside the upstream (``upstream.json``); on a
running stack it refuses other ones in one line naming the difference and the command that
applies it, and changes nothing.  A stand-in process carrying the issuer's module name in its
command line is "the running issuer" here (as ``ManagedProcess`` recognises it), so no stack
needs to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.cli import main as cli
from services.common.settings import InvalidSettingsError
from services.stack.native import (
    NativeStack,
    SettingsConflictError,
    StackSettings,
    console_pid_file,
    console_process,
)
from services.stack.processes import ManagedProcess
from services.stack.sandbox import REPO_ROOT
from tests.support.helpers import one_line, wait_until
from tests.support.sleeper import READY

SLEEPER = "tests.support.sleeper"
WAIT = 20.0  # a deadline for evidence, not a timing claim


def settings(tmp_path: Path, **overrides: Any) -> StackSettings:
    return StackSettings(
        home=tmp_path / "var", registry=REPO_ROOT / "infra" / "registry.json", **overrides
    )


def stack(tmp_path: Path, **overrides: Any) -> NativeStack:
    return NativeStack(settings(tmp_path, **overrides))


class StandIns:
    """Processes that ``ManagedProcess`` takes for the stack's (their command line carries the
    marker), SIGKILLed and reaped afterwards whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: list[int] = []

    def start(self, name: str, marker: str, env: dict[str, str] | None = None) -> ManagedProcess:
        home = self.tmp_path / "var"
        process = ManagedProcess(
            name,
            marker,
            home / "run" / "pids",
            home / "log",
            argv=(sys.executable, "-m", SLEEPER, marker),
        )
        self.pids.append(process.start({"PYTHONPATH": str(REPO_ROOT), **(env or {})}))
        wait_until(
            lambda: READY in process.log_tail(),
            timeout=WAIT,
            message=lambda: f"{name} did not start: {process.log_tail()}",
        )
        return process

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[StandIns]:
    started = StandIns(tmp_path)
    yield started
    started.cleanup()


def record(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / "var" / "upstream.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"upstream": "disk", **fields}))
    return path


def running_issuer(stand_ins: StandIns, env: dict[str, str] | None = None) -> ManagedProcess:
    return stand_ins.start("issuer", "services.issuer", env)


# -- what `up` runs the issuer with ------------------------------------------------------------


def test_a_new_stack_runs_with_what_is_asked_and_the_issuers_defaults(tmp_path: Path) -> None:
    assert stack(tmp_path).durations() == {
        "svid_ttl": timedelta(minutes=5),
        "ca_ttl": timedelta(hours=24),
        "crl_ttl": timedelta(minutes=5),  # the issuer's default: the SVID TTL
    }
    assert stack(tmp_path, svid_ttl="20s", ca_ttl="2h").durations() == {
        "svid_ttl": timedelta(seconds=20),
        "ca_ttl": timedelta(hours=2),
        "crl_ttl": timedelta(seconds=20),
    }
    # Not running: what an earlier `up` recorded is no reason to refuse anything.
    record(tmp_path, svid_ttl="20s", ca_ttl="24h", crl_ttl="20s")
    assert stack(tmp_path, svid_ttl="5m").durations()["svid_ttl"] == timedelta(minutes=5)


def test_the_ttls_reach_the_issuers_environment_when_set(tmp_path: Path) -> None:
    env = stack(tmp_path, svid_ttl="20s", ca_ttl="2h", crl_ttl="10s").env
    assert (env["ZTBANK_SVID_TTL"], env["ZTBANK_CA_TTL"], env["ZTBANK_CRL_TTL"]) == (
        "20s",
        "2h",
        "10s",
    )
    assert "ZTBANK_CA_TTL" not in stack(tmp_path).env


def test_an_invalid_duration_is_refused_naming_its_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettingsError) as refused:
        stack(tmp_path, svid_ttl="20").durations()
    assert str(refused.value) == (
        "invalid setting ZTBANK_SVID_TTL: invalid duration '20': use a number and a unit,"
        " e.g. 20s, 5m, 1h"
    )


def test_a_running_stack_keeps_its_durations_and_refuses_others_in_one_line(
    tmp_path: Path, stand_ins: StandIns
) -> None:
    record(tmp_path, svid_ttl="5m", ca_ttl="24h", crl_ttl="5m")
    running_issuer(stand_ins)

    with pytest.raises(SettingsConflictError) as refused:
        stack(tmp_path, svid_ttl="20s").durations()
    assert str(refused.value) == (
        "the running stack has SVIDs of 5m, not 20s: make down && ZTBANK_SVID_TTL=20s make up"
    )

    with pytest.raises(SettingsConflictError) as refused:
        stack(tmp_path, svid_ttl="20s", ca_ttl="2h", crl_ttl="5m").durations()
    assert str(refused.value) == (
        "the running stack has SVIDs of 5m, not 20s, and a CA TTL of 1d, not 2h:"
        " make down && ZTBANK_SVID_TTL=20s ZTBANK_CA_TTL=2h make up"
    )

    # The same settings, however written, or none: what runs.
    running = {
        "svid_ttl": timedelta(minutes=5),
        "ca_ttl": timedelta(hours=24),
        "crl_ttl": timedelta(minutes=5),
    }
    assert stack(tmp_path).durations() == running
    assert stack(tmp_path, svid_ttl="300s", ca_ttl="1d").durations() == running


def test_a_running_stack_that_recorded_no_durations_is_read_from_its_issuers_environment(
    tmp_path: Path, stand_ins: StandIns
) -> None:
    record(tmp_path)  # an `up` from before the durations were recorded
    running_issuer(stand_ins, {"ZTBANK_SVID_TTL": "20s"})

    assert stack(tmp_path).durations()["crl_ttl"] == timedelta(seconds=20)
    with pytest.raises(SettingsConflictError, match="has SVIDs of 20s, not 5m: make down"):
        stack(tmp_path, svid_ttl="5m").durations()


def test_make_up_with_another_svid_ttl_on_a_running_stack_is_exit_2_and_changes_nothing(
    tmp_path: Path,
    stand_ins: StandIns,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recorded = record(tmp_path, svid_ttl="5m", ca_ttl="24h", crl_ttl="5m")
    before = recorded.read_bytes()
    issuer = running_issuer(stand_ins)
    pid = issuer.pid()
    pid_files = sorted(issuer.pid_dir.iterdir())
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))
    monkeypatch.setenv("ZTBANK_REGISTRY", str(REPO_ROOT / "infra" / "registry.json"))
    monkeypatch.setenv("ZTBANK_SVID_TTL", "20s")

    code = cli.main(["up"])

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert one_line(err) == (
        "ztbank: the running stack has SVIDs of 5m, not 20s:"
        " make down && ZTBANK_SVID_TTL=20s make up"
    )
    assert issuer.pid() == pid
    assert sorted(issuer.pid_dir.iterdir()) == pid_files  # nothing else started
    assert recorded.read_bytes() == before
    assert not (tmp_path / "certs").exists()  # not even the root CA


def test_another_upstream_is_exit_2_as_well(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record(tmp_path)
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))

    code = cli.main(["up", "--upstream", "vault"])

    assert code == 2
    assert "set up with the disk upstream" in one_line(capsys.readouterr().err)


# -- `down` stops the console -------------------------------------------------------------------


def test_a_console_writes_its_pid_file_while_it_serves_and_removes_it(tmp_path: Path) -> None:
    stack_settings = settings(tmp_path)
    with console_pid_file(stack_settings, 8190) as pid_file:
        assert pid_file == tmp_path / "var" / "run" / "pids" / "console-8190.pid"
        assert pid_file.read_text() == f"{os.getpid()}\n"
    assert not pid_file.exists()


def test_down_stops_every_console_of_the_stack(tmp_path: Path, stand_ins: StandIns) -> None:
    consoles = [stand_ins.start(f"console-{port}", "console") for port in (8190, 18190)]
    pids = [console.pid() for console in consoles]
    assert None not in pids
    native = stack(tmp_path)
    assert native.consoles() == {
        8190: console_process(native.settings, 8190),
        18190: console_process(native.settings, 18190),
    }

    assert native.down() == ["console on port 8190", "console on port 18190"]

    for console in consoles:
        assert not console.running()
        assert not console.pid_file.exists()
    assert native.down() == []


def test_a_stale_console_pid_file_is_removed_and_nothing_is_stopped(tmp_path: Path) -> None:
    # A console killed outright left its pid file; the pid now names another process (ours).
    pid_file = console_process(settings(tmp_path), 8190).pid_file
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(f"{os.getpid()}\n")
    assert stack(tmp_path).down() == []
    assert not pid_file.exists()
