"""``ztbank lab all`` (``make lab-all``): every lab of the registry in turn, in its order, on the
running stack, under one lab lock for the whole run, then a summary table.

Each lab runs as ``ztbank lab NAME`` would run it, with its options' defaults, and narrates as it
does.  Its verdict is ``passed`` or ``failed`` (what its run returned), or ``refused`` with the
one line that refused it (an error that is the user's to fix: a stack it does not run on, a part
of the stack not running); an error that stopped a lab half-way fails it, with its line.  Either
way the run goes on with the next lab: each lab puts back what it changes, also when it fails.

Whether the run as a whole did is checked too: what the labs change and put back (the policy
file and the trust table the gateway watches, the root key, the files a lab keeps while an edit
is in place), the issuer running with the settings it ran with (the outage lab restarts it),
no service restarted, every service healthy, Vault unsealed on a Vault upstream.  Balances may
move (the labs transfer money); the issuer's CAs and revocations move as the labs make them
(the upstream lab renews the signing CA, the revocation lab revokes a serial it minted).

The run passes (exit 0) when every lab passed and the stack is as the run found it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from services.common.errors import CommonError
from services.common.identity.workloads import TELLER
from services.common.polling import poll_until
from services.issuer.adapters.upstream.disk import ROOT_KEY_FILE
from services.issuer.admin_client import AdminCallError
from services.issuer.errors import IssuerError
from services.labs.class_profile import CLASS_SVID_TTL
from services.labs.errors import LabError, LabUsageError
from services.labs.registry import Lab
from services.labs.support import (
    Say,
    check_stack_running,
    issuer_started,
    service_starts,
    watched_file,
)
from services.labs.upstream import OFFLINE_SUFFIX
from services.stack.native import RECORDED_DURATIONS, NativeStack, StackSettings, workload_svid

Verdict = Literal["passed", "failed", "refused", "interrupted", "not run"]
PASSED: Verdict = "passed"
# The issuer settings the run must leave as it found them (the outage lab restarts the issuer).
ISSUER_VARIABLES = (*(variable for _, variable, _ in RECORDED_DURATIONS), "ZTBANK_UPSTREAM")
LAB_BACKUPS = "lab-*.original.json"  # what a lab keeps under ZTBANK_HOME/run while it edits
# How long the stack may take to be healthy again after the run: as long as the outage lab gives
# it to recover (a run interrupted there has just started the issuer again).
SETTLE_SECONDS = 30.0
SETTLE_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class LabResult:
    lab: str
    verdict: Verdict
    seconds: float
    line: str = ""  # why it was refused, or the error that stopped it


def _refusal(error: Exception) -> bool:
    """True for an error that is the user's to fix (``ztbank`` exits 2 on it): the lab did not
    run, it was refused; False for one that stopped a running lab (exit 1)."""
    if isinstance(error, AdminCallError):
        return error.bad_input
    return isinstance(error, LabUsageError | CommonError)


Ready = Callable[[StackSettings], None]  # raises LabUsageError when no lab can run now


def run_one(
    lab: Lab, settings: StackSettings, say: Say, clock: Callable[[], float], ready: Ready
) -> LabResult:
    """``lab`` with its options' defaults, as ``ztbank lab NAME`` runs it (the stack checked
    by ``ready`` first), narrating through ``say``; its verdict and how long it took.
    KeyboardInterrupt goes through (the lab has put the stack back by then)."""
    options = {option.name: option.default for option in lab.options}
    started = clock()
    try:
        ready(settings)
        passed = lab.run(settings, say, **options)
    except (LabError, CommonError, IssuerError) as error:
        refused = _refusal(error)
        say(f"lab {lab.name} {'refused' if refused else 'stopped'}: {error}")
        verdict: Verdict = "refused" if refused else "failed"
        return LabResult(lab.name, verdict, clock() - started, str(error))
    except Exception as error:  # a bug in one lab: the others still run
        traceback.print_exc()
        line = f"{type(error).__name__}: {error}"
        say(f"lab {lab.name} crashed: {line}")
        return LabResult(lab.name, "failed", clock() - started, line)
    return LabResult(lab.name, "passed" if passed else "failed", clock() - started)


def run_labs(
    labs: Sequence[Lab],
    settings: StackSettings,
    say: Say,
    *,
    starting: Callable[[Lab], None] = lambda lab: None,
    clock: Callable[[], float] = time.monotonic,
    ready: Ready = check_stack_running,
) -> list[LabResult]:
    """Every lab of ``labs`` in turn (``starting`` is told of each first); one result each.
    Ctrl-C stops the run: that lab is ``interrupted`` and the rest ``not run``."""
    results: list[LabResult] = []
    for number, lab in enumerate(labs, start=1):
        say("")
        say(f"[{number}/{len(labs)}] ztbank lab {lab.name}")
        starting(lab)
        started = clock()
        try:
            results.append(run_one(lab, settings, say, clock, ready))
        except KeyboardInterrupt:
            results.append(LabResult(lab.name, "interrupted", clock() - started))
            results += [LabResult(rest.name, "not run", 0.0) for rest in labs[number:]]
            break
    return results


def summary(results: Sequence[LabResult], seconds: float) -> list[str]:
    """The table of the run: lab, verdict, seconds, and the line of a refused or stopped lab;
    then the total."""
    width = max([len("lab"), *(len(r.lab) for r in results)])
    verdicts = max([len("verdict"), *(len(r.verdict) for r in results)])
    lines = [f"  {'lab':<{width}}  {'verdict':<{verdicts}}  seconds"]
    for result in results:
        row = f"  {result.lab:<{width}}  {result.verdict:<{verdicts}}  {result.seconds:7.1f}"
        lines.append(f"{row}  {result.line}" if result.line else row)
    lines.append(f"  {'total':<{width}}  {'':<{verdicts}}  {seconds:7.1f}")
    return lines


def all_passed(results: Sequence[LabResult]) -> bool:
    return bool(results) and all(result.verdict == PASSED for result in results)


def verdict_line(results: Sequence[LabResult], changes: Sequence[str], seconds: float) -> str:
    """The run's last line."""
    if all_passed(results) and not changes:
        return f"all {len(results)} labs passed in {seconds:.0f} s"
    others = [f"{r.lab} ({r.verdict})" for r in results if r.verdict != PASSED]
    if not others:
        return f"all {len(results)} labs passed in {seconds:.0f} s, but the stack was left changed"
    return f"{len(others)} of {len(results)} labs did not pass: {', '.join(others)}"


# -- the stack as the run found it ---------------------------------------------------------------


@dataclass(frozen=True)
class StackState:
    """What the run must leave as it found it (balances aside)."""

    files: dict[str, bytes | None]  # the policy file and trust table the gateway watches
    root_key: str  # "in place", "offline", "absent" (disk upstream; "" on Vault or compose)
    backups: tuple[str, ...]  # files a lab keeps while its edit is in place
    issuer_running: bool
    issuer_settings: dict[str, str | None]  # the TTLs and upstream it was started with
    service_starts: dict[str, float | None]
    unhealthy: tuple[str, ...] = ()
    vault: str = ""  # Vault's state on a Vault upstream
    unknown: tuple[str, ...] = field(default_factory=tuple)  # what could not be read


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def snapshot(settings: StackSettings) -> StackState:
    """The stack's state in the respects of ``StackState``."""
    stack = NativeStack(settings)
    unknown: list[str] = []
    files: dict[str, bytes | None] = {}
    for variable, default, what in (
        ("ZTBANK_POLICY", settings.policy, "policy"),
        ("ZTBANK_TRUST_LEVELS", settings.trust_levels, "trust table"),
    ):
        try:
            path = watched_file(stack, variable, default, what)
        except LabError as error:
            unknown.append(f"the {what}: {error}")
            continue
        files[str(path)] = _read(path)
    native = settings.stack_kind == "native"
    issuer_env = (stack.issuer.environment() or {}) if native else {}
    root_key = ""
    if native and stack.recorded_upstream() != "vault":
        key = Path(issuer_env.get("ZTBANK_CERTS_DIR") or settings.certs_dir) / ROOT_KEY_FILE
        aside = key.with_name(key.name + OFFLINE_SUFFIX)
        root_key = "offline" if aside.exists() else "in place" if key.exists() else "absent"
    backups = tuple(sorted(path.name for path in settings.run_dir.glob(LAB_BACKUPS)))
    running = stack.issuer.running() if native else issuer_started(settings) is not None
    unhealthy = tuple(name for name, probe in stack.probes().items() if not probe.healthy)
    vault = stack.vault.health().state if stack.recorded_upstream() == "vault" else ""
    return StackState(
        files=files,
        root_key=root_key,
        backups=backups,
        issuer_running=running,
        issuer_settings={variable: issuer_env.get(variable) for variable in ISSUER_VARIABLES},
        service_starts=service_starts(settings),
        unhealthy=unhealthy,
        vault=vault,
        unknown=tuple(unknown),
    )


def changes(before: StackState, after: StackState) -> list[str]:
    """What the run left otherwise than it found it, one line each (empty: nothing)."""
    found: list[str] = []
    for path, content in before.files.items():
        if after.files.get(path) != content:
            found.append(f"{path} differs from what it was")
    if after.root_key != before.root_key:
        found.append(f"the root key is {after.root_key} (was {before.root_key})")
    if left := sorted(set(after.backups) - set(before.backups)):
        found.append(f"a lab left its backup(s) {', '.join(left)} under the stack's run/")
    if before.issuer_running and not after.issuer_running:
        found.append("the issuer is not running")
    elif after.issuer_settings != before.issuer_settings:
        found.append(f"the issuer runs with {after.issuer_settings} (was {before.issuer_settings})")
    restarted = [
        name
        for name, start in after.service_starts.items()
        if start is None or start != before.service_starts.get(name)
    ]
    if restarted:
        found.append(f"restarted or not answering: {', '.join(restarted)}")
    if sick := sorted(set(after.unhealthy) - set(before.unhealthy)):
        found.append(f"not healthy: {', '.join(sick)}")
    if after.vault != before.vault:
        found.append(f"Vault is {after.vault} (was {before.vault})")
    found += [f"cannot tell {what}" for what in after.unknown if what not in before.unknown]
    return found


def recovering(before: StackState, after: StackState) -> bool:
    """True while a service that was healthy before the run is not, or the issuer that ran does
    not: what a lab interrupted just after it started the issuer again looks like for a moment."""
    return bool(set(after.unhealthy) - set(before.unhealthy)) or (
        before.issuer_running and not after.issuer_running
    )


def settled(
    read: Callable[[StackSettings], StackState],
    settings: StackSettings,
    before: StackState,
    timeout: float = SETTLE_SECONDS,
) -> StackState:
    """The stack's state after the run, once it is no longer ``recovering`` (read again every
    SETTLE_POLL_SECONDS), or as it is after ``timeout``: a stack that does not recover is left
    changed."""
    seen: list[StackState] = []

    def recovered() -> StackState | None:
        seen.append(read(settings))
        return None if recovering(before, seen[-1]) else seen[-1]

    return poll_until(recovered, timeout=timeout, interval=SETTLE_POLL_SECONDS) or seen[-1]


def unchanged_line(state: StackState) -> str:
    """What was checked, when nothing changed."""
    checked = [
        *(f"{Path(path).name}" for path in state.files),
        *(["the root key"] if state.root_key else []),
        "no lab backup left",
        "the issuer running with its settings",
        "no service restarted",
        "every service healthy",
        *(["Vault unsealed"] if state.vault else []),
    ]
    return f"the stack is as the run found it: {', '.join(checked)}"


def svid_lifetime(settings: StackSettings) -> float | None:
    """Seconds an SVID the issuer issues now lives (the teller's), None if it gives none."""
    try:
        return workload_svid(settings, TELLER.name).lifetime.total_seconds()
    except CommonError:
        return None


# -- the run -------------------------------------------------------------------------------------

INTERRUPTED_EXIT = 130


def run_all(
    settings: StackSettings,
    say: Say,
    labs: Sequence[Lab],
    *,
    starting: Callable[[Lab], None] = lambda lab: None,
    clock: Callable[[], float] = time.monotonic,
    ready: Ready = check_stack_running,
    state: Callable[[StackSettings], StackState] = snapshot,
    lifetime: Callable[[StackSettings], float | None] = svid_lifetime,
    settle_seconds: float = SETTLE_SECONDS,
) -> int:
    """``ztbank lab all`` under the lab lock its caller holds (``starting`` is told of each lab,
    to say so in the lock): every lab of ``labs`` in turn, the table, whether the stack is as
    the run found it; 0 when every lab passed and it is, 130 when interrupted, else 1.  A stack
    that does not run is refused first (LabUsageError from ``ready``)."""
    ready(settings)
    say(
        f"lab all: the {len(labs)} labs in turn on the stack in ZTBANK_HOME={settings.home},"
        " one lab lock for the run"
    )
    seconds_per_svid = lifetime(settings)
    if seconds_per_svid is not None:
        say(f"  SVIDs live {seconds_per_svid:.0f} s here")
        if seconds_per_svid > CLASS_SVID_TTL.total_seconds():
            say(
                "  rotation and outage wait for SVIDs to renew and to lapse: minutes with these;"
                " `make class` restarts the stack with the class profile (20 s SVIDs)"
            )
    before = state(settings)
    started = clock()
    results = run_labs(labs, settings, say, starting=starting, clock=clock, ready=ready)
    seconds = clock() - started
    after = settled(state, settings, before, settle_seconds)
    left = changes(before, after)
    say("")
    say(f"summary of ztbank lab all ({len(results)} labs):")
    for line in summary(results, seconds):
        say(line)
    if left:
        say(f"the stack was LEFT CHANGED: {'; '.join(left)}")
    else:
        say(unchanged_line(after))
    say(verdict_line(results, left, seconds))
    if any(result.verdict == "interrupted" for result in results):
        return INTERRUPTED_EXIT
    return 0 if all_passed(results) and not left else 1
