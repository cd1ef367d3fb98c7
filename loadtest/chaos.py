"""``make load-chaos``: the mixed load while SVIDs rotate and one client's SVID is revoked.

Two kinds of locust users run against the gateway (profile ``chaos``), both as the teller's
SPIFFE ID but with separately minted X509-SVIDs:

* the tellers (``MixedUser``), which close their keep-alive connection every few seconds so that
  new handshakes meet the gateway's rotated certificates;
* one victim (``VictimUser``), a new connection per request, whose SVID is revoked by serial
  (``ztbank revoke --serial HEX``) a third of the way into the run.

Rotation happens by itself when the stack runs with short SVIDs: ``ZTBANK_SVID_TTL=20s make up``
(the services renew at 40-50 % of the TTL).  If ``ztbank revoke --help`` fails, the revocation
part is skipped with a message and only rotation is exercised.

Afterwards: locust's table per endpoint (the victim's requests are named ``[victim] ...``), then
every request's outcome by kind of user and cause (HTTP status, connection refused/reset,
TLS refused, gateway identity), before and after the revocation.  The run passes (exit 0) if
the tellers had no failure at all, the victim none before its revocation, and the victim was
refused after it and never served again once ``--grace`` had passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.report import report, table
from loadtest.run import (
    LoadError,
    LocustRun,
    gateway_url,
    html_report_path,
    mint_teller_svid,
    print_html_report,
    run_seconds,
    stack_environment,
    ztbank_executable,
)
from services.common.errors import CommonError
from services.common.settings import load_settings
from services.stack.native import StackSettings

TELLER, VICTIM = "teller", "victim"  # as the locustfile names them
OK = "ok"
RECONNECT_SECONDS = 2.0
REVOKE_AT = 1 / 3  # of the run
GRACE_SECONDS = 5.0  # services poll the issuer's CRLs every 0.5 s
CLI_TIMEOUT = 30.0


@dataclass(frozen=True)
class Revocation:
    serial: str
    requested: float  # epoch seconds when `ztbank revoke` was started ...
    done: float  # ... and when it returned


def revoke_cli_available(env: Mapping[str, str]) -> str | None:
    """None if ``ztbank revoke`` exists, else why not."""
    try:
        done = subprocess.run(
            [ztbank_executable(), "revoke", "--help"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    return None


def revoke(serial: str, env: Mapping[str, str]) -> Revocation:
    requested = time.time()
    done = subprocess.run(
        [ztbank_executable(), "revoke", "--serial", serial],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise LoadError(
            f"ztbank revoke --serial {serial} exited {done.returncode}:"
            f" {(done.stderr or done.stdout).strip()}"
        )
    print(f"chaos: {done.stdout.strip() or f'revoked serial {serial}'}", flush=True)
    return Revocation(serial, requested, time.time())


# -- the breakdown ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    start: float  # epoch seconds, to the tenth, when the requests started
    who: str
    outcome: str  # "ok" or the failure's cause
    count: int


@dataclass(frozen=True)
class Outcomes:
    rows: list[Outcome]
    connections: dict[str, int]
    gateway_serials: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Outcomes:
        document = json.loads(path.read_text())
        return cls(
            rows=[Outcome(**row) for row in document["outcomes"]],
            connections={str(k): int(v) for k, v in document["connections"].items()},
            gateway_serials=list(document["gateway_serials"]),
        )


def _phase(start: float, revocation: Revocation | None) -> str:
    if revocation is None:
        return "whole run"
    return "before revocation" if start < revocation.requested else "after revocation"


def breakdown(outcomes: Outcomes, revocation: Revocation | None) -> str:
    """Requests by kind of user and outcome (rows), before/after the revocation (columns)."""
    phases = ["whole run"] if revocation is None else ["before revocation", "after revocation"]
    counts: Counter[tuple[str, str, str]] = Counter()
    for row in outcomes.rows:
        counts[(row.who, row.outcome, _phase(row.start, revocation))] += row.count
    keys = sorted(
        {(who, outcome) for who, outcome, _ in counts}, key=lambda k: (k[0], k[1] != OK, k[1])
    )
    rows = [("client", "outcome", *phases)]
    for who, outcome in keys:
        label = "tellers" if who == TELLER else who
        rows.append((label, outcome, *(f"{counts[(who, outcome, p)]:,}" for p in phases)))
    return table(rows, (False, False, *([True] * len(phases))))


@dataclass(frozen=True)
class Verdict:
    problems: list[str]
    notes: list[str]


def judge(outcomes: Outcomes, revocation: Revocation | None, grace: float) -> Verdict:
    problems: list[str] = []
    notes: list[str] = []
    teller_failures: Counter[str] = Counter()
    for row in outcomes.rows:
        if row.who == TELLER and row.outcome != OK:
            teller_failures[row.outcome] += row.count
    if teller_failures:
        listed = ", ".join(f"{n} {cause}" for cause, n in teller_failures.most_common())
        problems.append(f"the tellers had failures ({listed}): rotation or revocation hit them")
    served = len(outcomes.gateway_serials)
    lifetimes = {round(s["lifetime_seconds"]) for s in outcomes.gateway_serials}
    if served > 1:
        notes.append(
            f"rotation: the gateway served {served} certificates during the run"
            f" (lifetime {', '.join(f'{s}s' for s in sorted(lifetimes))}),"
            f" met on {outcomes.connections.get(TELLER, 0):,} teller connections"
        )
    else:
        notes.append(
            "rotation: the gateway kept one certificate for the whole run; for rotation under"
            " load restart the stack with short SVIDs: make down && ZTBANK_SVID_TTL=20s make up"
        )
    victim = [r for r in outcomes.rows if r.who == VICTIM]
    if not victim:
        problems.append("the victim made no request")
        return Verdict(problems, notes)
    if revocation is None:
        victim_failures = sum(r.count for r in victim if r.outcome != OK)
        if victim_failures:
            problems.append(f"the victim had {victim_failures} failures without any revocation")
        return Verdict(problems, notes)
    early = sum(r.count for r in victim if r.start < revocation.requested and r.outcome != OK)
    if early:
        problems.append(f"the victim had {early} failures before it was revoked")
    refused = [r for r in victim if r.start >= revocation.requested and r.outcome != OK]
    late_ok = [r for r in victim if r.start >= revocation.done + grace and r.outcome == OK]
    if not refused:
        problems.append("the victim was never refused after its revocation")
    else:
        first = min(r.start for r in refused)
        causes: Counter[str] = Counter()
        for r in refused:
            causes[r.outcome] += r.count
        notes.append(
            f"revocation: the victim (serial {revocation.serial}) was refused from"
            f" {first - revocation.requested:.1f}s after `ztbank revoke` started (it returned"
            f" after {revocation.done - revocation.requested:.1f}s):"
            f" {', '.join(f'{n} {c}' for c, n in causes.most_common())}"
        )
    if late_ok:
        served_late = sum(r.count for r in late_ok)
        problems.append(
            f"the victim was still served {served_late} times more than {grace:g}s after"
            " its revocation"
        )
    return Verdict(problems, notes)


# -- the run ------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    seconds = run_seconds(args.duration)
    settings = load_settings(StackSettings)
    env = stack_environment(settings)
    chaos_dir = settings.home / "load" / "chaos"
    teller = mint_teller_svid(chaos_dir / "teller", settings, env)
    victim = mint_teller_svid(chaos_dir / "victim", settings, env)
    print(f"minted the tellers' SVID, serial {teller.serial} (valid until {teller.not_after})")
    print(f"minted the victim's SVID, serial {victim.serial} (valid until {victim.not_after})")
    missing = revoke_cli_available(env)
    if missing is not None:
        print(
            f"chaos: skipping revocation: `ztbank revoke --help` failed ({missing});"
            " exercising rotation only"
        )
    outcomes_file = chaos_dir / "outcomes.json"
    outcomes_file.unlink(missing_ok=True)
    run = LocustRun(
        profile="chaos",
        users=args.users,
        seconds=seconds,
        host=gateway_url(settings),
        csv_prefix=chaos_dir / "chaos",
        svid_dir=teller.directory,
        html_report=html_report_path(settings.home / "load", "chaos"),
        victim_svid_dir=victim.directory,
        extra_env={
            "ZTBANK_LOAD_RECONNECT": f"{RECONNECT_SECONDS:g}",
            "ZTBANK_LOAD_OUTCOMES": str(outcomes_file),
        },
    )
    print(run.describe(), flush=True)
    revocation: Revocation | None = None
    revoke_error: str | None = None
    with run.start(env) as process:
        try:
            if missing is None:
                deadline = time.monotonic() + seconds * REVOKE_AT
                while process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                if process.poll() is None:
                    try:
                        revocation = revoke(victim.serial, env)
                    except (LoadError, OSError, subprocess.TimeoutExpired) as error:
                        revoke_error = str(error)
                        print(f"chaos: revocation failed: {error}", flush=True)
            status = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait()
            raise
    print()
    # The victim's refusals are failures in this table (and in locust's exit status) by design:
    # the verdict below decides.
    report(run.csv_prefix)
    print_html_report(run)
    print()
    try:
        outcomes = Outcomes.load(outcomes_file)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"no outcomes from locust ({outcomes_file}: {error})")
        return 1
    print(breakdown(outcomes, revocation))
    print()
    verdict = judge(outcomes, revocation, args.grace)
    if revoke_error is not None:
        verdict.problems.append(f"the revocation itself failed: {revoke_error}")
    for note in verdict.notes:
        print(note)
    for problem in verdict.problems:
        print(f"FAILED: {problem}")
    if not verdict.problems:
        print("chaos: passed" + ("" if revocation else " (rotation only)"))
    # Locust's status is 1 whenever a request failed; above 1 it broke.
    return 1 if verdict.problems or status > 1 else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--users", type=int, default=20, help="concurrent locust users")
    parser.add_argument("--duration", default="60s", help="run time, e.g. 60s (max 9m)")
    parser.add_argument(
        "--grace",
        type=float,
        default=GRACE_SECONDS,
        help="seconds the revocation may take to reach the gateway",
    )
    args = parser.parse_args(argv)
    try:
        if args.users < 2:
            raise LoadError(f"USERS={args.users}: at least 2 (one of them is the victim)")
        return _run(args)
    except (LoadError, CommonError) as error:
        print(f"make load-chaos: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
