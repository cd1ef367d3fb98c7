"""`ztbank lab` runs one lab at a time (issue 21, item 4): two runs at once, the second refused
at once in one line naming the first and since when, exit 2, nothing changed; `--check` (what
`make lab-NAME` asks before its `make up`) refuses the same way; a lab the console started is
handed the console's lock."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cli import main as cli
from services.cli.commands import lab as lab_command
from services.labs.registry import LABS, Lab
from services.labs.support import LAB_LOCK_FD, LabLock
from services.stack.native import StackSettings
from tests.support.helpers import one_line, wait_until

WAIT = 20.0  # a deadline for evidence, not a timing claim


class BlockingLab:
    """A lab that says it started, then runs until the test lets it end."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.end = threading.Event()
        self.runs = 0

    def __call__(self, settings: StackSettings, say: Any) -> bool:
        self.runs += 1
        say("lab blocking: started")
        self.started.set()
        return self.end.wait(WAIT)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stack home with its run directory (a stack ran here), taken for running."""
    home = tmp_path / "var"
    (home / "run").mkdir(parents=True)
    monkeypatch.setenv("ZTBANK_HOME", str(home))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))
    monkeypatch.chdir(tmp_path)
    # The stack check has tests of its own (tests/unit/labs/test_lab_lock.py).
    monkeypatch.setattr(lab_command, "check_stack_running", lambda settings: None)
    return home


@pytest.fixture
def blocking(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockingLab]:
    lab = BlockingLab()
    monkeypatch.setattr(lab_command, "LABS", (*LABS, Lab("blocking", "runs until told", lab)))
    yield lab
    lab.end.set()


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else -1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refusal(home: Path, lab: str, by: str) -> str:
    record = json.loads((home / "run" / "lab.lock").read_text())
    since = time.strftime("%H:%M:%S", time.localtime(record["since"]))
    return (
        f"ztbank: lab {lab!r} is running (since {since}, pid {record['pid']},"
        f" started from {by}): one lab at a time"
    )


def test_two_labs_at_once_the_second_is_refused_in_one_line(
    home: Path, blocking: BlockingLab, capsys: pytest.CaptureFixture[str]
) -> None:
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(cli.main(["lab", "blocking"])))
    first.start()
    try:
        assert blocking.started.wait(WAIT), "the first lab never started"
        lock_file = home / "run" / "lab.lock"
        held = lock_file.read_bytes()

        code, out, err = run(["lab", "policy"], capsys)

        assert (code, out) == (2, "lab blocking: started\n")  # the first lab's line, not ours
        assert one_line(err) == refusal(home, "blocking", "the CLI")
        assert json.loads(held)["pid"] == os.getpid()
        assert lock_file.read_bytes() == held  # nothing changed
        # As `make lab-NAME` asks before its `make up`: the same line.
        code, out, err = run(["lab", "revocation", "--check"], capsys)
        assert (code, out) == (2, "")
        assert one_line(err) == refusal(home, "blocking", "the CLI")
    finally:
        blocking.end.set()
        first.join(WAIT)
    assert codes == [0]
    assert blocking.runs == 1
    assert (home / "run" / "lab.lock").read_text() == ""  # released with the lab's end
    assert run(["lab", "blocking", "--check"], capsys) == (0, "", "")


def test_a_lab_the_console_runs_refuses_a_lab_of_the_cli(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with LabLock.take(StackSettings(home=home), "revocation", "console"):
        code, out, err = run(["lab", "expiry"], capsys)
    assert (code, out) == (2, "")
    assert one_line(err).startswith("ztbank: lab 'revocation' is running (since ")
    assert err.endswith(", started from the console): one lab at a time\n")


def test_the_lab_the_console_starts_runs_with_the_lock_it_was_handed(
    home: Path,
    blocking: BlockingLab,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocking.end.set()
    with LabLock.take(StackSettings(home=home), "blocking", "console") as lock:
        # What the lab inherits: a descriptor of the console's own open file (a dup shares it).
        monkeypatch.setenv(LAB_LOCK_FD, str(os.dup(lock.fileno())))

        assert run(["lab", "blocking"], capsys) == (0, "lab blocking: started\n", "")

        assert LAB_LOCK_FD not in os.environ  # not passed on to what the lab starts
        assert blocking.runs == 1


def test_check_on_a_home_where_no_stack_ran_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "never"
    monkeypatch.setenv("ZTBANK_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert run(["lab", "policy", "--check"], capsys) == (0, "", "")
    assert not home.exists()


def test_an_unknown_lab_is_one_line_and_exit_2_before_any_lock(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["lab", "nosuch", "--check"], capsys)
    assert (code, out) == (2, "")
    assert "argument NAME: invalid choice: 'nosuch'" in one_line(err)
    assert not (home / "run" / "lab.lock").exists()


def test_the_lock_waits_for_nobody(home: Path, blocking: BlockingLab) -> None:
    # The refusal comes while the holder still runs: evidence that nothing waited for it.
    with LabLock.take(StackSettings(home=home), "outage", "cli"):
        refused = threading.Event()

        def second() -> None:
            if cli.main(["lab", "blocking"]) == 2:
                refused.set()

        other = threading.Thread(target=second)
        other.start()
        wait_until(refused.is_set, timeout=WAIT, message="the second lab was not refused")
        other.join(WAIT)
    assert blocking.runs == 0
