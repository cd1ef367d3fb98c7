"""``make bench-bank``: ztbank's request path side by side with a bare mutual-TLS pipeline.

Both run on this machine for the whole run: the bare pipeline (``loadtest.bare``: FastAPI ->
grpc.aio engine -> grpc.aio risk, mTLS on every hop, SQLite posting, nothing else) and a private
ztbank sandbox stack (gateway -> transfer-engine -> risk with SPIFFE identities, authorization,
audit, revocation checks, telemetry; the issuer beside them).  Only one is loaded at a time: for
every load point the bare row runs, then the ztbank row, so noise hits both alike.

Load points, for reads (``GET /v1/accounts/{id}``) and transfers (``POST /v1/transfers``):

* open loop at each ``--rates`` rate (latency counts from the scheduled time: queueing shows):
  20/s, a light load, then 100 and 300/s;
* closed loop with ``--connections`` keep-alive connections: the maximum throughput;
* the highest open-loop rate both hold (no errors, at least 95% of the offered rate done, p99 at
  most 10x the side's lowest open-loop p99, normally the one at the light load), found by
  bisection between the highest rate both held and the lowest either failed (or the lower
  closed-loop maximum), to ``--step``, in at most ``--search-rows`` extra rows.  (With 100/s as
  the lowest rate, a side that already queues there would be its own lax reference.)

Every row reports the achieved rate, p50/p99, errors, and the CPU milliseconds per completed
request of each server process (utime + stime from /proc/<pid>/stat around the loaded window),
of the issuer, and of the load generator, which runs in its own process (``loadtest.loadgen``).
Clients and servers share the machine's cores, so figures compare within one run only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from loadtest.bare.pipeline import BarePipeline
from loadtest.loadgen import Load, LoadResult, Target, Workload, run_in_process
from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.common.discovery.registry import FileRegistry
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, RISK, TELLER, TRANSFER_ENGINE
from services.issuer.admin_client import call_admin
from services.labs.teller import TellerClient
from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCOUNTS = ("acc-alice-cny", "acc-alice-savings")
# Velocity review would turn most benchmark transfers into held ones: relax it for the run.
BENCH_RULES = {"velocity_max_transfers": 1000, "velocity_window_seconds": 1}
KINDS = {
    "reads": ("read", "GET /v1/accounts/{id}"),
    "transfers": ("transfer", "POST /v1/transfers"),
}
EXPECTED_STATUS = {"reads": "200", "transfers": "201"}
# Server processes by role (ztbank's engine is the transfer-engine); only ztbank has an issuer.
ROLES = ("gateway", "engine", "risk", "issuer")
HOLD_ERRORS = 0
HOLD_ACHIEVED = 0.95  # of the offered rate
HOLD_P99_FACTOR = 10.0  # times the side's lowest open-loop p99 (normally at the lowest rate)
TELLER_TTL_SECONDS = 600  # the issuer's maximum; a fresh SVID is minted for every row
SIDES = ("bare", "ztbank")
# Servers using less than this (cores) are idle; background work (CRL polls, the issuer) stays.
SETTLED_CPU = 0.1
# Other processes using more than this (cores) during a row are reported as noise.
NOISE_CORES = 0.15
LEGEND = (
    "CPU ms per request: utime+stime of each process over the loaded window / requests done;"
    " lg busy: the load generator's CPU / wall time (100% = its one core saturated); host busy:"
    " all CPUs; others: CPU of every other process, in cores (noise)"
)


# -- pure parts: CPU accounting, hold criterion, rate search, formatting ---------------------


def parse_proc_stat(text: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of ``/proc/<pid>/stat``.  The
    command name (field 2) may hold spaces and parentheses: fields are counted after the last
    ')'.  utime and stime are fields 14 and 15."""
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def parse_host_stat(text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from the text of ``/proc/stat``."""
    values = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def cpu_ms_per_request(ticks_before: int, ticks_after: int, requests: int, hertz: int) -> float:
    """CPU milliseconds per completed request; NaN when none completed."""
    if requests <= 0:
        return math.nan
    return (ticks_after - ticks_before) * 1000 / hertz / requests


def others_cores(host_busy_ticks: int, own_ticks: int, wall: float, hertz: int) -> float:
    """Cores used by processes other than the measured ones (the servers of the loaded side and
    the load generator) over ``wall`` seconds: the benchmark's noise."""
    if wall <= 0:
        return math.nan
    return max(0, host_busy_ticks - own_ticks) / hertz / wall


def holds(result: LoadResult, reference_p99: float) -> tuple[bool, str]:
    """Whether an open-loop row held its rate, and if not, why."""
    if result.error_count > HOLD_ERRORS:
        return False, f"{result.error_count} errors"
    if result.achieved < HOLD_ACHIEVED * result.rate:
        return False, f"{result.achieved:.0f} of {result.rate:g} req/s done"
    p99 = result.latency_ms(0.99)
    if math.isnan(p99) or p99 > HOLD_P99_FACTOR * reference_p99:
        return False, f"p99 {p99:.1f} ms > {HOLD_P99_FACTOR:g}x {reference_p99:.1f} ms"
    return True, ""


def nice_step(value: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``value`` (and at least 1)."""
    if value <= 1:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for mantissa in (5, 2, 1):
        if mantissa * exponent <= value:
            return float(mantissa * exponent)
    return float(exponent)  # pragma: no cover - mantissa 1 always fits


@dataclass
class RateSearch:
    """Bisection for the highest rate both sides hold, in multiples of ``step``.  ``ceiling`` (the
    lower closed-loop maximum) counts as failed unless a rate above it held (more open-loop
    connections can do more); with no upper bound the rate doubles.  Known outcomes (the fixed
    rates) seed it without using up ``max_tries``."""

    ceiling: float
    step: float
    max_tries: int
    outcomes: dict[float, bool] = field(default_factory=dict)
    tries: int = 0

    def record(self, rate: float, held: bool, *, measured: bool = True) -> None:
        self.outcomes[rate] = held
        self.tries += measured

    @property
    def held(self) -> float | None:
        return max((r for r, ok in self.outcomes.items() if ok), default=None)

    def next_rate(self) -> float | None:
        if self.tries >= self.max_tries:
            return None
        low = self.held or 0.0
        bounds = [r for r, ok in self.outcomes.items() if not ok and r > low]
        if self.ceiling > low + self.step:
            bounds.append(self.ceiling)
        if not bounds:
            return 2 * low
        high = min(bounds)
        if high - low <= self.step:
            return None
        middle = low + max(self.step, math.floor((high - low) / 2 / self.step) * self.step)
        return middle if middle < high else None


def format_ratio(ztbank: float, bare: float) -> str:
    """ztbank / bare as ``3.6x`` (``0.17x`` below 1, ``12x`` from 10); ``-`` if undefined."""
    if not (math.isfinite(ztbank) and math.isfinite(bare)) or bare <= 0 or ztbank <= 0:
        return "-"
    ratio = ztbank / bare
    if ratio >= 10:
        return f"{ratio:.0f}x"
    if ratio >= 1:
        return f"{ratio:.1f}x"
    return f"{ratio:.2f}x"


def format_number(value: float, digits: int = 1) -> str:
    return "-" if not math.isfinite(value) else f"{value:,.{digits}f}"


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max) of the finite values; NaNs if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, math.nan
    return min(finite), statistics.median(finite), max(finite)


def render(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Columns padded to their widest cell; column indexes in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


# -- measured rows ---------------------------------------------------------------------------


@dataclass
class Row:
    kind: str  # reads | transfers
    point: str  # e.g. "open 100/s", "highest held 240/s", "closed, 16 conns"
    side: str  # bare | ztbank
    result: LoadResult
    cpu_ms: dict[str, float]  # role -> CPU ms per completed request; "loadgen" too
    loadgen_busy: float  # the load generator's CPU / wall time (1.0: one core saturated)
    host_busy: float  # all CPUs busy / (wall time x CPUs)
    others: float = 0.0  # cores used by every other process (noise), e.g. 0.3
    attempts: int = 1  # > 1: measured again because other processes made noise

    @property
    def p50(self) -> float:
        return self.result.latency_ms(0.50)

    @property
    def p99(self) -> float:
        return self.result.latency_ms(0.99)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "point": self.point,
            "side": self.side,
            "achieved": self.result.achieved,
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "errors": self.result.error_count,
            "cpu_ms_per_request": self.cpu_ms,
            "loadgen_busy": self.loadgen_busy,
            "host_busy": self.host_busy,
            "others_cores": self.others,
            "attempts": self.attempts,
        }


@dataclass
class Side:
    """One system under test: where to send, as whom, and which processes serve it."""

    name: str
    target: Callable[[], Target]  # called for every row (ztbank mints a fresh teller SVID)
    token: Callable[[], str]
    pids: Callable[[], dict[str, int | None]]  # role -> pid


def _ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, IndexError, ValueError):
        return None


def _host() -> tuple[int, int]:
    return parse_host_stat(Path("/proc/stat").read_text())


def measure(side: Side, kind: str, point: str, load: Load) -> Row:
    """One row: a load generator process against ``side``, CPU counters read around it."""
    hertz = os.sysconf("SC_CLK_TCK")
    pids = side.pids()
    before: dict[str, int | None] = {}
    after: dict[str, int | None] = {}
    host: list[tuple[int, int]] = []
    clock: list[float] = []

    def snapshot(into: dict[str, int | None], loadgen: int) -> None:
        clock.append(time.perf_counter())
        host.append(_host())
        into.update({role: _ticks(pid) for role, pid in pids.items()})
        into["loadgen"] = _ticks(loadgen)

    target = side.target()  # first: ztbank's token is asked for with the new SVID
    workload = Workload(KINDS[kind][0], side.token(), ACCOUNTS)
    result = run_in_process(
        target, workload, load, partial(snapshot, before), partial(snapshot, after)
    )
    cpu_ms = {}
    for role, ticks in before.items():
        later = after.get(role)
        cpu_ms[role] = (
            math.nan
            if ticks is None or later is None
            else cpu_ms_per_request(ticks, later, result.completed, hertz)
        )
    wall = clock[1] - clock[0]
    busy = (host[1][0] - host[0][0]) / max(1, host[1][1] - host[0][1])
    own = sum(
        later - ticks
        for role, ticks in before.items()
        if ticks is not None and (later := after.get(role)) is not None
    )
    return Row(
        kind=kind,
        point=point,
        side=side.name,
        result=result,
        cpu_ms=cpu_ms,
        loadgen_busy=result.cpu_seconds / wall if wall > 0 else math.nan,
        host_busy=busy,
        others=others_cores(host[1][0] - host[0][0], own, wall, hertz),
    )


def settle(pids: Sequence[int | None], interval: float = 0.2, timeout: float = 5.0) -> None:
    """Wait (at most ``timeout``) until the servers are idle: in-flight work of the last row,
    e.g. a backlog cut off by the load generator's exit, must not be charged to the next."""
    hertz = os.sysconf("SC_CLK_TCK")
    quiet_ticks = max(1, round(SETTLED_CPU * interval * hertz))
    deadline = time.monotonic() + timeout
    last = sum(t for t in map(_ticks, pids) if t is not None)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = sum(t for t in map(_ticks, pids) if t is not None)
        if now - last <= quiet_ticks:
            return
        last = now


def progress(row: Row) -> None:
    result = row.result
    print(
        f"  {row.kind:<9} {row.point:<22} {row.side:<6}  {result.achieved:8.1f} req/s"
        f"  p50 {row.p50:7.1f}  p99 {row.p99:7.1f} ms  errors {result.error_count}",
        file=sys.stderr,
        flush=True,
    )


@dataclass
class Plan:
    rates: list[float]
    seconds: float
    connections: int  # closed loop
    open_connections: int
    step: float  # 0: automatic
    search_rows: int
    warmup: float
    drain: float
    noise_retries: int = 1


def _pair(sides: Sequence[Side], kind: str, point: str, load: Load, retries: int) -> dict[str, Row]:
    """One load point: each side in turn (bare first), the servers idle before each row; the
    pair is measured again (at most ``retries`` times) while other processes made noise."""
    attempt = 1
    while True:
        measured = {}
        for side in sides:
            settle([pid for each in sides for pid in each.pids().values()])
            row = measure(side, kind, point, load)
            row.attempts = attempt
            progress(row)
            measured[side.name] = row
        if attempt > retries or not any(r.others > NOISE_CORES for r in measured.values()):
            return measured
        print("  other processes were busy: measuring this point again", file=sys.stderr)
        attempt += 1


def _both_hold(measured: dict[str, Row], open_rows: Sequence[dict[str, Row]]) -> tuple[bool, str]:
    """Whether every side held this point, and why not.  A side's reference p99 is its lowest
    open-loop p99 of the kind so far (at the lowest rate, unless that one was too much for it)."""

    def reference(name: str) -> float:
        return min((p[name].p99 for p in open_rows if math.isfinite(p[name].p99)), default=0)

    failures = []
    for name, row in measured.items():
        held, why = holds(row.result, reference(name))
        if not held:
            failures.append(f"{name} {why}")
    return not failures, ", ".join(failures)


def run_kind(sides: Sequence[Side], kind: str, plan: Plan) -> tuple[list[Row], str]:
    """The load points of one kind, in table order: the fixed rates, the highest rate both held
    (and the other rates the search tried), the closed loop; and what the search found."""

    def open_load(rate: float) -> Load:
        return Load(
            "open", plan.seconds, plan.open_connections, rate, timeout=10.0, drain=plan.drain
        )

    if plan.warmup > 0:
        warm = Load("closed", plan.warmup, plan.connections)
        for side in sides:
            row = measure(side, kind, "warm-up", warm)
            if row.result.error_count:
                progress(row)
    retries = plan.noise_retries
    fixed = {
        rate: _pair(sides, kind, f"open {rate:g}/s", open_load(rate), retries)
        for rate in plan.rates
    }
    closed = _pair(
        sides,
        kind,
        f"closed, {plan.connections} conns",
        Load("closed", plan.seconds, plan.connections),
        retries,
    )
    open_rows = list(fixed.values())
    ceiling = min(row.result.achieved for row in closed.values())
    step = plan.step or max(10.0, nice_step(ceiling / 20))
    search = RateSearch(ceiling=ceiling, step=step, max_tries=plan.search_rows)
    by_rate = dict(fixed)
    verdicts = {}
    for rate, measured in fixed.items():
        verdicts[rate] = _both_hold(measured, open_rows)
        search.record(rate, verdicts[rate][0], measured=False)
    while (candidate := search.next_rate()) is not None:
        by_rate[candidate] = _pair(
            sides, kind, f"search {candidate:g}/s", open_load(candidate), retries
        )
        open_rows.append(by_rate[candidate])
        verdicts[candidate] = _both_hold(by_rate[candidate], open_rows)
        search.record(candidate, verdicts[candidate][0])
    rows = [row for rate in plan.rates for row in fixed[rate].values()]
    held = search.held
    for rate in sorted(r for r in by_rate if r not in fixed):
        label = f"highest held {rate:g}/s" if rate == held else f"searched {rate:g}/s"
        for row in by_rate[rate].values():
            row.point = label
            rows.append(row)
    if held is not None and held in fixed:
        rows.extend(_relabel(row, f"highest held {held:g}/s") for row in fixed[held].values())
    rows.extend(closed.values())
    tried = "; ".join(
        f"{rate:g} {'held' if ok else 'not held (' + why + ')'}"
        for rate, (ok, why) in sorted(verdicts.items())
    )
    found = f"{held:g}/s" if held is not None else "none of the rates tried"
    note = (
        f"{kind}: highest rate both held {found} (search step {step:g}/s; lower closed-loop"
        f" maximum {ceiling:.0f}/s); {tried}"
    )
    return rows, note


def run_table(
    sides: Sequence[Side], kinds: Sequence[str], plan: Plan
) -> tuple[list[Row], list[str]]:
    """Every load point of every kind, bare then ztbank each time; and the search notes."""
    rows: list[Row] = []
    notes = []
    for kind in kinds:
        found, note = run_kind(sides, kind, plan)
        rows.extend(found)
        notes.append(note)
    return rows, notes


def _relabel(row: Row, point: str) -> Row:
    return Row(
        row.kind,
        point,
        row.side,
        row.result,
        row.cpu_ms,
        row.loadgen_busy,
        row.host_busy,
        row.others,
        row.attempts,
    )


# -- the printed table -----------------------------------------------------------------------

HEADER = (
    "load",
    "side",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "gateway",
    "engine",
    "risk",
    "issuer",
    "loadgen",
    "lg busy",
    "host busy",
    "others",
    "p99 zt/bare",
    "req/s zt/bare",
)


def _cpu(value: float | None) -> str:
    return "-" if value is None else format_number(value, 2)


def table_lines(rows: Sequence[Row]) -> list[str]:
    lines: list[list[str]] = [list(HEADER)]
    sections: list[tuple[int, str]] = []
    by_point: dict[tuple[str, str], dict[str, Row]] = defaultdict(dict)
    for row in rows:
        by_point[(row.kind, row.point)][row.side] = row
    for (kind, point), pair in by_point.items():
        if not sections or sections[-1][1] != kind:
            sections.append((len(lines), kind))
        for side in SIDES:
            found = pair.get(side)
            if found is None:
                continue
            row, result = found, found.result
            ratio_p99 = ratio_rate = ""
            bare = pair.get("bare")
            if side == "ztbank" and bare is not None:
                ratio_p99 = format_ratio(row.p99, bare.p99)
                if result.mode == "closed":
                    ratio_rate = format_ratio(result.achieved, bare.result.achieved)
            lines.append(
                [
                    point if side == SIDES[0] or "bare" not in pair else "",
                    side,
                    format_number(result.achieved),
                    format_number(row.p50),
                    format_number(row.p99),
                    str(result.error_count),
                    *(_cpu(row.cpu_ms.get(role)) for role in ROLES),
                    _cpu(row.cpu_ms.get("loadgen")),
                    f"{row.loadgen_busy:.0%}",
                    f"{row.host_busy:.0%}",
                    f"{row.others:.0%}",
                    ratio_p99,
                    ratio_rate,
                ]
            )
    rendered = render(lines, right=frozenset(range(2, len(HEADER))))
    width = max(len(line) for line in rendered)
    cpu_title = "CPU ms per request"
    cpu_start = rendered[0].index("gateway")
    out = [" " * cpu_start + cpu_title.ljust(width - cpu_start).rstrip(), rendered[0]]
    section_at = dict(sections)
    for index, line in enumerate(rendered[1:], start=1):
        if index in section_at:
            kind = section_at[index]
            out.append(f"{kind}: {KINDS[kind][1]}")
        out.append(line)
    return out


def error_lines(rows: Sequence[Row]) -> list[str]:
    """Errors grouped by side and reason, with the rows they happened in; then answers that
    succeeded with an unexpected status (e.g. 202: a transfer held for review)."""
    grouped: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for row in rows:
        for reason, count in row.result.errors.items():
            where = f"{row.kind} {row.point}"
            grouped[(row.side, reason)][where] = grouped[(row.side, reason)].get(where, 0) + count
        for status, count in row.result.statuses.items():
            if status.startswith("2") and status != EXPECTED_STATUS[row.kind]:
                key = (
                    row.side,
                    f"answered {status} (counted as done), not {EXPECTED_STATUS[row.kind]}",
                )
                where = f"{row.kind} {row.point}"
                grouped[key][where] = grouped[key].get(where, 0) + count
    lines = []
    for (side, reason), places in sorted(grouped.items(), key=lambda item: -sum(item[1].values())):
        total = sum(places.values())
        detail = "; ".join(f"{where}: {count:,}" for where, count in places.items())
        lines.append(f"  {side} {total:,}x {reason}  [{detail}]")
    return lines


def noise_lines(rows: Sequence[Row], limit: float = NOISE_CORES) -> list[str]:
    """A warning naming the rows during which other processes used more than ``limit`` cores."""
    lines = []
    again = sorted({f"{r.kind} {r.point} ({r.attempts} times)" for r in rows if r.attempts > 1})
    if again:
        lines.append(f"noise: measured again after other processes were busy: {', '.join(again)}")
    noisy = [row for row in rows if row.others > limit]
    if noisy:
        where = ", ".join(f"{r.side} {r.kind} {r.point} {r.others:.0%}" for r in noisy)
        lines.append(f"noise: other processes used more than {limit:.0%} of a core during: {where}")
    return lines


def grouped_errors(rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """side -> reason -> count over ``rows`` (for the JSON file and tests)."""
    totals: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        for reason, count in row.result.errors.items():
            totals[row.side][reason] = totals[row.side].get(reason, 0) + count
    return dict(totals)


def ratios(rows: Sequence[Row]) -> dict[str, float]:
    """Per load point: ztbank/bare of p99 ("<kind> <point> p99"), and of throughput for
    closed-loop points ("<kind> <point> req/s")."""
    pairs: dict[tuple[str, str], dict[str, Row]] = defaultdict(dict)
    for row in rows:
        if not row.point.startswith("searched"):  # the search's other rates vary by run
            pairs[(row.kind, _stable(row.point))][row.side] = row
    found: dict[str, float] = {}
    for (kind, point), pair in pairs.items():
        if "bare" not in pair or "ztbank" not in pair:
            continue
        bare, ztbank = pair["bare"], pair["ztbank"]
        found[f"{kind} {point} p99"] = _divide(ztbank.p99, bare.p99)
        if bare.result.mode == "closed":
            found[f"{kind} {point} req/s"] = _divide(ztbank.result.achieved, bare.result.achieved)
    return found


def _stable(point: str) -> str:
    """A load point's name without the rate the search found (it may differ between runs)."""
    return "highest held" if point.startswith("highest held") else point


def _divide(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def spread_lines(runs: Sequence[dict[str, float]]) -> list[str]:
    keys = list(runs[0])
    header = ["ztbank/bare", *(f"run {i}" for i in range(1, len(runs) + 1)), "min", "median", "max"]
    lines = [header]
    for key in keys:
        values = [run.get(key, math.nan) for run in runs]
        low, middle, high = spread(values)
        cells = [format_ratio(v, 1.0) for v in (*values, low, middle, high)]
        lines.append([key, *cells])
    return render(lines, right=frozenset(range(1, len(header))))


# -- ztbank and bare sides -------------------------------------------------------------------


def minted_teller(stack: NativeStack, ttl_seconds: int) -> SvidMaterial:
    """A teller SVID from the admin API: it outlives short workload TTLs and can be revoked
    without touching the real teller."""
    spiffe_id = TELLER.spiffe_id(stack.settings.trust_domain)
    request = pb.MintX509SVIDRequest(spiffe_id=str(spiffe_id), ttl_seconds=ttl_seconds)
    reply = call_admin(stack.settings.admin_socket, lambda stub: stub.MintX509SVID(request))
    key = serialization.load_pem_private_key(reply.key_pem, password=None)
    return SvidMaterial(
        spiffe_id=SpiffeId.parse(str(spiffe_id)),
        chain=tuple(x509.load_pem_x509_certificates(reply.chain_pem)),
        key=key,
        bundle=tuple(x509.load_pem_x509_certificates(reply.bundle_pem)),
    )


class ZtbankTeller:
    """The teller's TLS material as files for the load generator, renewed for every row, and a
    customer token for alice obtained with it (POST /v1/tokens, as the CLI does)."""

    def __init__(self, stack: NativeStack, directory: Path) -> None:
        self._stack = stack
        self._directory = directory
        self._material: SvidMaterial | None = None

    def target(self) -> Target:
        self._material = minted_teller(self._stack, TELLER_TTL_SECONDS)
        cert, key, bundle = (self._directory / n for n in ("svid.pem", "svid.key", "bundle.pem"))
        key.touch(mode=0o600)
        key.write_bytes(self._material.key_pem)
        cert.write_bytes(self._material.chain_pem)
        bundle.write_bytes(self._material.bundle_pem)
        address = FileRegistry(self._stack.settings.registry).lookup(GATEWAY.name)
        # The gateway's SVID names it by a SPIFFE ID in a URI SAN, not by a host name, so host
        # name checking is off; the chain is still verified against the trust bundle.  (The
        # TellerClient also matches the SPIFFE ID; the load generator trusts the sandbox's
        # registry for that, as the measured thing is the server, not this check.)
        return Target(address.host, address.port, bundle, cert, key, check_hostname=False)

    def token(self) -> str:
        return TellerClient(self._stack.settings, self._material).token("alice")


def ztbank_pids(stack: NativeStack) -> dict[str, int | None]:
    return {
        "gateway": stack.services[GATEWAY.name].pid(),
        "engine": stack.services[TRANSFER_ENGINE.name].pid(),
        "risk": stack.services[RISK.name].pid(),
        "issuer": stack.issuer.pid(),
    }


@contextmanager
def sides(scratch: Path) -> Iterator[tuple[list[Side], NativeStack]]:
    """Both systems up for the whole run (the bare pipeline first: it starts faster)."""
    rules = scratch / "rules.json"
    rules.write_text(json.dumps(BENCH_RULES))
    teller_dir = scratch / "teller"
    teller_dir.mkdir(mode=0o700)
    with ExitStack() as stack:
        bare = stack.enter_context(BarePipeline())
        ztbank = stack.enter_context(sandbox_stack(risk_rules=rules))
        teller = ZtbankTeller(ztbank, teller_dir)
        bare_target = Target(bare.host, bare.port, bare.ca, bare.cert, bare.key)
        yield (
            [
                Side("bare", lambda: bare_target, lambda: "", lambda: dict(bare.pids)),
                Side("ztbank", teller.target, teller.token, partial(ztbank_pids, ztbank)),
            ],
            ztbank,
        )


# -- revocation propagation (kept from the earlier benchmark; --revocation) ------------------


def _refused(client: TellerClient, connection: Any) -> bool:
    try:
        return client.request("GET", "/healthz", connection=connection).status != 200
    except Exception:  # any failure to be served counts as refused here
        return True


async def _revoke(stub: IssuerAdminStub, *, serial: str) -> pb.RevokeResponse:
    return await stub.Revoke(pb.RevokeRequest(serial=serial, reason="keyCompromise"))


def revocation_propagation(stack: NativeStack, count: int) -> tuple[list[float], list[float]]:
    """Seconds from `Revoke` returning until (a) a new connection and (b) an open keep-alive
    connection of the revoked client are refused, over ``count`` revocations."""
    new_connection, open_connection = [], []
    for _ in range(count):
        victim = minted_teller(stack, 120)
        client = TellerClient(stack.settings, victim)
        kept = client.connect()
        assert client.request("GET", "/healthz", connection=kept).status == 200
        call_admin(stack.settings.admin_socket, partial(_revoke, serial=victim.serial))
        revoked = time.perf_counter()
        seen: dict[str, float] = {}
        while len(seen) < 2 and time.perf_counter() - revoked < 10:
            if "new" not in seen and _refused(client, None):
                seen["new"] = time.perf_counter() - revoked
            if "open" not in seen and _refused(client, kept):
                seen["open"] = time.perf_counter() - revoked
            time.sleep(0.005)
        kept.close()
        new_connection.append(seen.get("new", float("inf")))
        open_connection.append(seen.get("open", float("inf")))
    return new_connection, open_connection


def revocation_lines(stack: NativeStack, count: int) -> list[str]:
    new_connection, open_connection = revocation_propagation(stack, count)
    lines = [f"revocation propagation over {count} revocations (seconds after Revoke)"]
    for name, samples in (
        ("new connection refused", new_connection),
        ("open connection cut", open_connection),
    ):
        lines.append(
            f"  {name:<24} median {statistics.median(samples):.3f}  worst {max(samples):.3f}"
        )
    return lines


# -- main ------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_label() -> str:
    """The commit, and whether services/ differs from it (the benchmark runs the work tree)."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown commit"
    if not _git("status", "--porcelain", "--", "services"):
        return commit
    diff = hashlib.sha256(_git("diff", "HEAD", "--", "services").encode()).hexdigest()[:8]
    return f"{commit} + uncommitted changes in services/ (diff sha256 {diff})"


def bare_http() -> str:
    """The HTTP implementation uvicorn picks for the bare gateway (``http="auto"``)."""
    return "httptools" if importlib.util.find_spec("httptools") else "h11"


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default."""


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each row")
    parser.add_argument(
        "--rates",
        type=_floats,
        default="20,100,300",
        help="open-loop rates, req/s; the lowest is the light-load reference of the search",
    )
    parser.add_argument(
        "--kinds", default="reads,transfers", help="reads, transfers or both (comma-separated)"
    )
    parser.add_argument("--connections", type=int, default=16, help="closed-loop connections")
    parser.add_argument(
        "--open-connections",
        type=int,
        default=32,
        help="open-loop connections (a due request waits for a free one, and the wait counts)",
    )
    parser.add_argument(
        "--step", type=float, default=0.0, help="resolution of the highest-held search (0: auto)"
    )
    parser.add_argument(
        "--search-rows", type=int, default=3, help="most rate pairs the search may measure"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="closed-loop warm-up per kind and side, s"
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=None,
        help="open loop: answers are awaited this + 10 s after the last is due (None: --seconds)",
    )
    parser.add_argument(
        "--noise-retries",
        type=int,
        default=1,
        help="measure a load point again (at most this often) when other processes used more"
        f" than {NOISE_CORES * 100:.0f}%% of a core during one of its rows",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the whole table N times")
    parser.add_argument("--json", type=Path, help="save every row (with raw latencies) here")
    parser.add_argument(
        "--revocation", action="store_true", help="also time revocation propagation (ztbank)"
    )
    parser.add_argument("--revocations", type=int, default=10, help="revocations to time")
    args = parser.parse_args(argv)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            parser.error(f"unknown kind {kind!r} (reads, transfers)")
    if not args.rates:
        parser.error("--rates needs at least one rate")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    plan = Plan(
        rates=sorted(args.rates),
        seconds=args.seconds,
        connections=args.connections,
        open_connections=args.open_connections,
        step=args.step,
        search_rows=args.search_rows,
        warmup=args.warmup,
        drain=args.seconds if args.drain is None else args.drain,
        noise_retries=args.noise_retries,
    )
    kinds = args.kinds.split(",")
    label = code_label()
    began = time.monotonic()
    started = datetime.now(UTC)
    runs: list[list[Row]] = []
    run_notes: list[list[str]] = []
    extra: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ztbench") as scratch, sides(Path(scratch)) as up:
        both, ztbank = up
        print(f"both stacks up after {time.monotonic() - began:.1f}s", file=sys.stderr)
        for run in range(args.repeat):
            if args.repeat > 1:
                print(f"run {run + 1} of {args.repeat}", file=sys.stderr)
            rows, notes = run_table(both, kinds, plan)
            runs.append(rows)
            run_notes.append(notes)
        if args.revocation:
            extra = revocation_lines(ztbank, args.revocations)
    took = time.monotonic() - began
    title = (
        f"bench-bank: ztbank vs bare mTLS pipeline; code {label}; {started:%Y-%m-%d %H:%M} UTC;"
        f" {os.cpu_count()} CPUs; {plan.seconds:g} s rows; open loop {plan.open_connections}"
        f" connections; bare gateway HTTP: {bare_http()}"
    )
    for number, (rows, notes) in enumerate(zip(runs, run_notes, strict=True), start=1):
        print()
        print(title + (f"; run {number} of {len(runs)}" if len(runs) > 1 else ""))
        for line in table_lines(rows):
            print(line)
        for note in notes:
            print(note)
        print(LEGEND)
        for line in noise_lines(rows):
            print(line)
        errors = error_lines(rows)
        print("errors: none" if not errors else "errors (by side and reason):")
        for line in errors:
            print(line)
    run_ratios = [ratios(rows) for rows in runs]
    if len(runs) > 1:
        print()
        print(f"ratios ztbank/bare over {len(runs)} runs")
        for line in spread_lines(run_ratios):
            print(line)
    for line in extra:
        print(line)
    print(f"took {took:.0f}s")
    if args.json:
        document = {
            "code": label,
            "started": started.isoformat(timespec="seconds"),
            "seconds_taken": took,
            "plan": asdict(plan),
            "kinds": kinds,
            "runs": [
                {
                    "rows": [row.summary() | {"raw": asdict(row.result)} for row in rows],
                    "ratios": ratio,
                    "errors": grouped_errors(rows),
                    "search": notes,
                }
                for rows, ratio, notes in zip(runs, run_ratios, run_notes, strict=True)
            ],
            "revocation": extra,
        }
        args.json.write_text(json.dumps(document, indent=1, allow_nan=True) + "\n")
        print(f"raw results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
