"""`ztbank lab all` (issue 21, item 1), with fake labs and no stack: every lab in registry order,
one verdict each (passed, failed, refused with its one line), the summary table, the exit code
(0 only when every lab passed and the stack is as the run found it), and one lab lock held for
the whole run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from services.cli import main as cli
from services.cli.commands import lab as lab_command
from services.issuer.errors import IssuerError
from services.labs import run_all as run_all_module
from services.labs.errors import LabError, LabUsageError
from services.labs.registry import ALL, CLASS, LABS, Lab
from services.labs.run_all import (
    LabResult,
    StackState,
    changes,
    run_all,
    run_labs,
    summary,
    verdict_line,
)
from services.labs.support import LabLock, LabRunningError
from services.stack.native import StackSettings


class Clock:
    """Time that moves only when a fake lab says it took some."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_lab(name: str, clock: Clock, seconds: float, outcome: bool | BaseException) -> Lab:
    """A lab that narrates one line, takes ``seconds`` and returns or raises ``outcome``."""

    def run(settings: StackSettings, say: Callable[[str], None]) -> bool:
        say(f"lab {name}: running")
        clock.now += seconds
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return Lab(name, f"the {name} lab", run)


def state(**changed: Any) -> StackState:
    base: dict[str, Any] = {
        "files": {"/s/policy.json": b"{}", "/s/trust-levels.json": b"{}"},
        "root_key": "in place",
        "backups": (),
        "issuer_running": True,
        "issuer_settings": {"ZTBANK_SVID_TTL": "20s"},
        "service_starts": {"gateway": 1.0, "risk": 2.0},
    }
    return StackState(**(base | changed))


def settings(tmp_path: Path) -> StackSettings:
    return StackSettings(home=tmp_path / "var", certs_dir=tmp_path / "certs")


def no_check(settings: StackSettings) -> None:
    return None


def run(
    tmp_path: Path,
    labs: list[Lab],
    clock: Clock,
    states: Iterator[StackState] | None = None,
) -> tuple[int, list[str]]:
    said: list[str] = []
    steady = iter([state(), state()]) if states is None else states
    code = run_all(
        settings(tmp_path),
        said.append,
        labs,
        clock=clock,
        ready=no_check,
        state=lambda settings: next(steady),
        lifetime=lambda settings: 20.0,
    )
    return code, said


def table(said: list[str]) -> list[str]:
    """The summary's lines, from its heading to the last line."""
    start = next(i for i, line in enumerate(said) if line.startswith("summary of ztbank lab all"))
    return said[start:]


def test_every_lab_passes_exit_0_and_the_table_says_so(tmp_path: Path) -> None:
    clock = Clock()
    labs = [fake_lab("first", clock, 2.5, True), fake_lab("second-lab", clock, 30.04, True)]

    code, said = run(tmp_path, labs, clock)

    assert code == 0
    assert table(said) == [
        "summary of ztbank lab all (2 labs):",
        "  lab         verdict  seconds",
        "  first       passed       2.5",
        "  second-lab  passed      30.0",
        "  total                   32.5",
        "the stack is as the run found it: policy.json, trust-levels.json, the root key, no lab"
        " backup left, the issuer running with its settings, no service restarted, every"
        " service healthy",
        "all 2 labs passed in 33 s",
    ]
    # In order, each announced, each narrating.
    assert said.index("[1/2] ztbank lab first") < said.index("lab first: running")
    assert said.index("lab first: running") < said.index("[2/2] ztbank lab second-lab")


def test_a_failed_and_a_refused_lab_are_named_the_others_still_run_exit_1(tmp_path: Path) -> None:
    clock = Clock()
    native_only = "the outage lab stops and starts the issuer's process: native stack only"
    labs = [
        fake_lab("passes", clock, 1.0, True),
        fake_lab("fails", clock, 4.0, False),
        fake_lab("refused", clock, 0.0, LabUsageError(native_only)),
        fake_lab("stopped", clock, 2.0, LabError("cannot mint a teller SVID for the lab: gone")),
        fake_lab("issuer", clock, 0.5, IssuerError("the issuer has no valid signing CA")),
        fake_lab("crashes", clock, 0.25, ValueError("a bug")),
        fake_lab("last", clock, 1.0, True),
    ]

    code, said = run(tmp_path, labs, clock)

    assert code == 1
    assert table(said)[1:9] == [
        "  lab      verdict  seconds",
        "  passes   passed       1.0",
        "  fails    failed       4.0",
        f"  refused  refused      0.0  {native_only}",
        "  stopped  failed       2.0  cannot mint a teller SVID for the lab: gone",
        "  issuer   failed       0.5  the issuer has no valid signing CA",
        "  crashes  failed       0.2  ValueError: a bug",
        "  last     passed       1.0",
    ]
    assert said[-1] == (
        "5 of 7 labs did not pass: fails (failed), refused (refused), stopped (failed),"
        " issuer (failed), crashes (failed)"
    )
    assert f"lab refused refused: {native_only}" in said


def test_a_stack_left_changed_fails_the_run_though_every_lab_passed(tmp_path: Path) -> None:
    clock = Clock()
    after = state(root_key="offline", files={"/s/policy.json": b"{", "/s/trust-levels.json": b"{}"})

    code, said = run(tmp_path, [fake_lab("only", clock, 1.0, True)], clock, iter([state(), after]))

    assert code == 1
    assert said[-2] == (
        "the stack was LEFT CHANGED: /s/policy.json differs from what it was;"
        " the root key is offline (was in place)"
    )
    assert said[-1] == "all 1 labs passed in 1 s, but the stack was left changed"


def test_an_interrupted_run_stops_there_with_the_rest_not_run(tmp_path: Path) -> None:
    clock = Clock()
    labs = [
        fake_lab("one", clock, 1.0, True),
        fake_lab("two", clock, 3.0, KeyboardInterrupt()),
        fake_lab("three", clock, 1.0, True),
    ]

    code, said = run(tmp_path, labs, clock)

    assert code == 130
    assert table(said)[2:5] == [
        "  one    passed           1.0",
        "  two    interrupted      3.0",
        "  three  not run          0.0",
    ]
    assert "lab three: running" not in said


def test_a_stack_that_does_not_run_refuses_the_run_before_any_lab(tmp_path: Path) -> None:
    clock = Clock()
    lab = fake_lab("never", clock, 1.0, True)

    def stopped(settings: StackSettings) -> None:
        raise LabUsageError("no stack runs in ZTBANK_HOME=/x")

    with pytest.raises(LabUsageError, match="no stack runs"):
        run_all(
            settings(tmp_path),
            print,
            [lab],
            ready=stopped,
            state=lambda settings: state(),
            lifetime=lambda settings: 1.0,
        )


def test_a_lab_whose_stack_check_fails_is_refused_with_that_line(tmp_path: Path) -> None:
    clock = Clock()
    checks = iter([None, LabUsageError("the stack is not all running (issuer stopped)")])

    def ready(settings: StackSettings) -> None:
        if (error := next(checks)) is not None:
            raise error

    results = run_labs(
        [fake_lab("a", clock, 1.0, True), fake_lab("b", clock, 1.0, True)],
        settings(tmp_path),
        lambda line: None,
        clock=clock,
        ready=ready,
    )

    assert results == [
        LabResult("a", "passed", 1.0),
        LabResult("b", "refused", 0.0, "the stack is not all running (issuer stopped)"),
    ]


def test_slow_svids_are_pointed_at_make_class(tmp_path: Path) -> None:
    clock = Clock()
    said: list[str] = []
    steady = iter([state(), state()])
    run_all(
        settings(tmp_path),
        said.append,
        [fake_lab("a", clock, 1.0, True)],
        clock=clock,
        ready=no_check,
        state=lambda settings: next(steady),
        lifetime=lambda settings: 300.0,
    )
    assert said[1] == "  SVIDs live 300 s here"
    assert "`make class` restarts the stack with the class profile" in said[2]


@pytest.mark.parametrize(
    ("after", "line"),
    [
        (state(backups=("lab-policy.original.json",)), "a lab left its backup(s)"),
        (state(issuer_running=False), "the issuer is not running"),
        (state(issuer_settings={"ZTBANK_SVID_TTL": "5m"}), "the issuer runs with"),
        (state(service_starts={"gateway": 1.0, "risk": 9.0}), "restarted or not answering: risk"),
        (state(service_starts={"gateway": 1.0, "risk": None}), "restarted or not answering: risk"),
        (state(unhealthy=("gateway",)), "not healthy: gateway"),
        (state(vault="sealed"), "Vault is sealed"),
    ],
)
def test_each_change_the_run_could_leave_is_named(after: StackState, line: str) -> None:
    [found] = changes(state(), after)
    assert found.startswith(line)


def test_a_stack_that_recovers_after_the_run_is_not_left_changed(tmp_path: Path) -> None:
    """A run interrupted just after the outage lab started the issuer again: the services are
    not healthy for a moment, then are; read again until they are."""
    clock = Clock()
    reads = iter([state(), state(unhealthy=("gateway", "risk")), state(unhealthy=("risk",))])
    code, said = run(tmp_path, [fake_lab("only", clock, 1.0, True)], clock, iter([*reads, state()]))
    assert code == 0
    assert said[-2].startswith("the stack is as the run found it")


def test_a_stack_that_does_not_recover_is_left_changed(tmp_path: Path) -> None:
    said: list[str] = []
    reads: list[StackState] = []

    def read(settings: StackSettings) -> StackState:
        reads.append(state(issuer_running=not reads))  # running before the run, never after
        return reads[-1]

    code = run_all(
        settings(tmp_path),
        said.append,
        [fake_lab("only", Clock(), 1.0, True)],
        ready=no_check,
        state=read,
        lifetime=lambda settings: 20.0,
        settle_seconds=0.0,
    )
    assert code == 1
    assert said[-2] == "the stack was LEFT CHANGED: the issuer is not running"


def test_the_table_aligns_long_names_and_verdicts() -> None:
    results = [LabResult("x", "passed", 1.04), LabResult("a-long-name", "not run", 0.0)]
    assert summary(results, 1.04) == [
        "  lab          verdict  seconds",
        "  x            passed       1.0",
        "  a-long-name  not run      0.0",
        "  total                     1.0",
    ]
    assert verdict_line(results, [], 1.0) == "1 of 2 labs did not pass: a-long-name (not run)"


def test_no_lab_takes_the_names_of_the_commands_beside_them() -> None:
    assert not {lab.name for lab in LABS} & {ALL, CLASS}


# -- ztbank lab all: one lab lock for the whole run ------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stack home with its run directory (a stack ran here), taken for running."""
    home = tmp_path / "var"
    (home / "run").mkdir(parents=True)
    monkeypatch.setenv("ZTBANK_HOME", str(home))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))
    monkeypatch.chdir(tmp_path)
    return home


def test_ztbank_lab_all_holds_one_lab_lock_from_the_first_lab_to_the_last(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each lab finds the lock taken, naming the run and that lab; another lab is refused."""
    refusals: list[str] = []
    holders: list[str] = []

    def lab(name: str) -> Lab:
        def run(settings: StackSettings, say: Callable[[str], None]) -> bool:
            holders.append(json.loads((home / "run" / "lab.lock").read_text())["lab"])
            with pytest.raises(LabRunningError) as refused:
                LabLock.take(settings, "policy", "cli")
            refusals.append(str(refused.value))
            return True

        return Lab(name, f"the {name} lab", run)

    monkeypatch.setattr(lab_command, "LABS", (lab("first"), lab("second")))
    steady = iter([state(), state()])
    monkeypatch.setattr(
        lab_command,
        "run_all",
        partial(
            run_all_module.run_all,
            ready=no_check,
            state=lambda settings: next(steady),
            lifetime=lambda settings: 20.0,
        ),
    )

    code = cli.main(["lab", "all"])
    out = capsys.readouterr().out

    assert code == 0, out
    assert holders == ["all (first)", "all (second)"]
    assert all(r.startswith("lab 'all (") and r.endswith("one lab at a time") for r in refusals)
    assert out.splitlines()[-1] == "all 2 labs passed in 0 s"
    assert (home / "run" / "lab.lock").read_text() == ""  # released, and says nothing


def test_ztbank_lab_all_while_a_lab_runs_is_refused_in_one_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = StackSettings()
    with LabLock.take(settings, "outage", "cli"):
        code = cli.main(["lab", "all"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.startswith("ztbank: lab 'outage' is running (since ")
    assert captured.err.count("\n") == 1


def test_ztbank_lab_lists_all_and_class_beside_the_labs(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["lab"]) == 0
    out = capsys.readouterr().out
    assert "`ztbank lab all` (`make lab-all`) runs them all in turn" in out
    assert "`ztbank lab class`" in out
