"""``make test-stress``: tests that once depended on a quiet machine, run again and again while
busy loops hold every core, to show that they now wait on evidence, not on the clock.

    python -m tests.stress [--times 20] [--busy N] [--streams 2] [TEST ...]

Each repetition is a pytest run of its own (fresh stacks, fresh issuers), ``--streams`` of them
at a time; ``--busy`` processes spin meanwhile (default: one per core).  Every run is printed
with its outcome and time (a failed one's output goes to var/log/stress/); the exit status is 1
if any run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The whole output of each failed run, to read the cause.
LOGS = REPO / "var" / "log" / "stress"

# Every test whose verdict once hung on a wall-clock threshold (issue 20, item 5).
FORMERLY_TIMING_BOUND = (
    "tests/e2e/test_breaker.py",
    "tests/e2e/test_rotation.py::test_rotation_under_continuous_load",
    "tests/integration/test_issuer.py::test_x509_svid_rotates_with_fresh_serial_and_key_before_55_percent",
    "tests/integration/test_issuer.py::test_ca_rotation_publishes_new_ca_before_it_signs",
    "tests/integration/test_issuer.py::test_ca_rotation_publishes_new_ca_a_quarter_ttl_before_it_signs",
    "tests/integration/test_revocation_issuer.py::test_revoking_a_workloads_current_svid_delivers_a_fresh_one",
    "tests/integration/test_mtls_runtime.py::test_https_beyond_the_in_flight_limit_is_shed_at_once_with_503",
    "tests/unit/cli/test_home.py",
    "tests/unit/stack/test_processes.py",
)
BUSY_LOOP = "while True: pass"


@dataclass(frozen=True)
class Run:
    number: int
    passed: bool
    seconds: float
    summary: str


def _repeat(number: int, tests: list[str]) -> Run:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    if done.returncode != 0:
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"run-{number}.log"
        log.write_text(done.stdout + done.stderr)
        summary = "; ".join([summary, *failures, f"output in {log}"])
    return Run(number, done.returncode == 0, time.monotonic() - started, summary)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__)
    parser.add_argument("--times", type=int, default=20, help="repetitions (default 20)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy loops")
    parser.add_argument("--streams", type=int, default=2, help="repetitions run at a time")
    parser.add_argument("tests", nargs="*", default=list(FORMERLY_TIMING_BOUND))
    args = parser.parse_args(argv)
    if args.times < 1 or args.busy < 0 or args.streams < 1:
        parser.error("--times and --streams must be at least 1, --busy at least 0")
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy)]
    print(
        f"stress: {args.times} runs of {len(args.tests)} test selections, {args.streams} at a"
        f" time, {args.busy} busy loops on {os.cpu_count()} cores",
        flush=True,
    )
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(args.streams) as pool:
            runs = []
            for run in pool.map(lambda n: _repeat(n, args.tests), range(1, args.times + 1)):
                verdict = "passed" if run.passed else "FAILED"
                print(f"run {run.number:>3}: {verdict} in {run.seconds:.0f} s  {run.summary}")
                runs.append(run)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    failed = [run.number for run in runs if not run.passed]
    print(
        f"stress: {len(runs) - len(failed)} of {len(runs)} runs passed in"
        f" {time.monotonic() - started:.0f} s" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
