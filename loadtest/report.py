"""Locust's ``--csv`` results as a compact table: per endpoint p50/p95/p99, requests per second
and failures, then the failures by error.

``python -m loadtest.report var/load/mixed`` reads ``var/load/mixed_stats.csv`` and
``var/load/mixed_failures.csv``; it exits 1 if any request failed (or none was made).
"""

from __future__ import annotations

import argparse
import ast
import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

AGGREGATED = "Aggregated"
_CATCH_RESPONSE = re.compile(r"CatchResponseError\((.*)\)", re.DOTALL)


@dataclass(frozen=True)
class EndpointStats:
    method: str  # empty on the aggregated row
    name: str
    requests: int
    failures: int
    requests_per_second: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def endpoint(self) -> str:
        return f"{self.method} {self.name}" if self.method else "all"


@dataclass(frozen=True)
class FailureStats:
    method: str
    name: str
    error: str
    occurrences: int


def _milliseconds(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def stats_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + "_stats.csv")


def failures_file(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + "_failures.csv")


def read_stats(prefix: Path) -> list[EndpointStats]:
    """Every endpoint's row, then the aggregated row last (as locust writes them)."""
    with stats_file(prefix).open(newline="") as handle:
        return [
            EndpointStats(
                method=row["Type"] if row["Name"] != AGGREGATED else "",
                name=row["Name"],
                requests=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                requests_per_second=float(row["Requests/s"]),
                p50_ms=_milliseconds(row.get("50%")),
                p95_ms=_milliseconds(row.get("95%")),
                p99_ms=_milliseconds(row.get("99%")),
                max_ms=_milliseconds(row.get("Max Response Time")),
            )
            for row in csv.DictReader(handle)
        ]


def readable_error(error: str) -> str:
    """The message of a failure marked by the locustfile (locust stores the exception's repr)."""
    match = _CATCH_RESPONSE.fullmatch(error)
    if match is None:
        return error
    try:
        return str(ast.literal_eval(match.group(1)))
    except (ValueError, SyntaxError):
        return match.group(1)


def read_failures(prefix: Path) -> list[FailureStats]:
    path = failures_file(prefix)
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [
            FailureStats(
                row["Method"], row["Name"], readable_error(row["Error"]), int(row["Occurrences"])
            )
            for row in csv.DictReader(handle)
        ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; ``right`` aligns numeric columns to the right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if align_right else cell.ljust(width)
            for cell, width, align_right in zip(row, widths, right, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_stats(stats: Sequence[EndpointStats]) -> str:
    header = ("endpoint", "requests", "failed", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms")
    rows = [header]
    for entry in stats:
        rows.append(
            (
                entry.endpoint,
                f"{entry.requests:,}",
                f"{entry.failures:,}",
                f"{entry.requests_per_second:,.1f}",
                _ms(entry.p50_ms),
                _ms(entry.p95_ms),
                _ms(entry.p99_ms),
                _ms(entry.max_ms),
            )
        )
    return table(rows, (False, *([True] * (len(header) - 1))))


def format_failures(failures: Sequence[FailureStats]) -> str:
    rows = [("failures", "endpoint", "error")]
    for failure in sorted(failures, key=lambda f: -f.occurrences):
        rows.append((f"{failure.occurrences:,}", f"{failure.method} {failure.name}", failure.error))
    return table(rows, (True, False, False))


def total(stats: Sequence[EndpointStats]) -> EndpointStats | None:
    return next((entry for entry in stats if entry.name == AGGREGATED), None)


def report(prefix: Path) -> int:
    """Print the tables; 0 if requests were made and none failed, else 1."""
    try:
        stats = read_stats(prefix)
    except (OSError, KeyError, ValueError) as error:
        print(f"no locust statistics at {stats_file(prefix)}: {error}")
        return 1
    print(format_stats(stats))
    failures = read_failures(prefix)
    if failures:
        print()
        print(format_failures(failures))
    overall = total(stats)
    if overall is None or overall.requests == 0:
        print("no request was made")
        return 1
    if overall.failures:
        print(f"{overall.failures:,} of {overall.requests:,} requests failed")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prefix", type=Path, help="the --csv prefix locust was given")
    return report(parser.parse_args(argv).prefix)


if __name__ == "__main__":
    raise SystemExit(main())
