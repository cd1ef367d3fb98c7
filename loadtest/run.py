"""``make load``: one locust profile, headless, against the running stack's gateway.

1. ``ztbank svid mint`` writes a 10-minute teller X509-SVID into ``$ZTBANK_HOME/load/teller``
   (the issuer must be running: ``make up``, which ``make load`` runs first; it is idempotent);
2. locust runs the profile (``loadtest/profiles/PROFILE.conf``, the user classes below) for a fixed
   time against the gateway's address in the service registry (``infra/registry.json``);
3. ``loadtest/report.py`` prints p50/p95/p99, requests per second and failures per endpoint from
   locust's CSV files (``$ZTBANK_HOME/load/PROFILE_stats.csv``).

The exit status is 1 if any request failed (or none was made), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.report import report
from services.common.discovery.registry import FileRegistry
from services.common.durations import parse_duration
from services.common.errors import CommonError
from services.common.identity.workloads import GATEWAY, TELLER
from services.common.settings import load_settings
from services.stack.native import StackSettings

LOADTEST_DIR = Path(__file__).resolve().parent
LOCUSTFILE = LOADTEST_DIR / "locustfile.py"
PROFILE_DIR = LOADTEST_DIR / "profiles"
# Profile -> the locustfile's user classes it runs.
PROFILES: dict[str, tuple[str, ...]] = {
    "reads": ("ReadsUser",),
    "transfers": ("TransfersUser",),
    "mixed": ("MixedUser",),
    "chaos": ("MixedUser", "VictimUser"),
}
SVID_TTL = "10m"  # the issuer's maximum
MAX_RUN_SECONDS = 9 * 60  # the minted SVID must outlive the run
MINT_TIMEOUT = 30.0
CSV_SUFFIXES = ("_stats.csv", "_failures.csv", "_exceptions.csv", "_stats_history.csv")


class LoadError(Exception):
    """The load run could not be set up (the message says what to do)."""


def ztbank_executable() -> str:
    """The ``ztbank`` console script beside this interpreter (the project's venv)."""
    beside = Path(sys.executable).with_name("ztbank")
    return str(beside) if beside.exists() else "ztbank"


def run_seconds(text: str) -> int:
    """``30s``, ``2m`` ... as whole seconds; at least 1 s, at most ``MAX_RUN_SECONDS``."""
    try:
        seconds = round(parse_duration(text).total_seconds())
    except CommonError as error:
        raise LoadError(f"DURATION: {error}") from None
    if not 1 <= seconds <= MAX_RUN_SECONDS:
        raise LoadError(
            f"DURATION={text}: must be between 1s and {MAX_RUN_SECONDS // 60}m"
            f" (the teller SVID is minted for {SVID_TTL})"
        )
    return seconds


def stack_environment(
    settings: StackSettings, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (default: this process's environment) pointed at the stack of ``settings``."""
    return {
        **(os.environ if base is None else base),
        "ZTBANK_HOME": str(settings.home),
        "ZTBANK_CERTS_DIR": str(settings.certs_dir),
        "ZTBANK_TRUST_DOMAIN": settings.trust_domain,
        "ZTBANK_ISSUER_HTTP": settings.issuer_http,
        "ZTBANK_REGISTRY": str(settings.registry.absolute()),
    }


@dataclass(frozen=True)
class MintedSvid:
    spiffe_id: str
    serial: str
    not_after: str
    directory: Path


def mint_teller_svid(
    out: Path, settings: StackSettings, env: Mapping[str, str], ttl: str = SVID_TTL
) -> MintedSvid:
    """``ztbank svid mint`` of the teller's SPIFFE ID into ``out``; ``env`` must point the CLI
    at the stack of ``settings`` (``stack_environment``), whose issuer must be running."""
    spiffe_id = str(TELLER.spiffe_id(settings.trust_domain))
    command = [ztbank_executable(), "svid", "mint", "--spiffe-id", spiffe_id]
    command += ["--out", str(out), "--ttl", ttl, "--json"]
    try:
        done = subprocess.run(
            command,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=MINT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LoadError(f"ztbank svid mint: {error}") from None
    if done.returncode != 0:
        raise LoadError(
            f"cannot mint a teller SVID ({done.stderr.strip() or done.stdout.strip()});"
            " is the stack up? (make up)"
        )
    summary = json.loads(done.stdout)
    return MintedSvid(spiffe_id, str(summary["serial"]), str(summary["not_after"]), out)


def gateway_url(settings: StackSettings) -> str:
    try:
        address = FileRegistry(settings.registry).lookup(GATEWAY.name)
    except CommonError as error:
        raise LoadError(str(error)) from None
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"https://{host}:{address.port}"


@dataclass(frozen=True)
class LocustRun:
    profile: str
    users: int
    seconds: int
    host: str
    csv_prefix: Path
    svid_dir: Path
    victim_svid_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    spawn_rate: float | None = None  # None: the profile's
    # locust's own HTML report (request rate, percentiles and users over time); None: none.
    html_report: Path | None = None

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "locust",
            "--config",
            str(PROFILE_DIR / f"{self.profile}.conf"),
        ]
        command += ["--locustfile", str(LOCUSTFILE), "--headless", "--host", self.host]
        command += ["--users", str(self.users), "--run-time", f"{self.seconds}s"]
        command += ["--csv", str(self.csv_prefix)]
        if self.spawn_rate is not None:
            command += ["--spawn-rate", f"{self.spawn_rate:g}"]
        if self.html_report is not None:
            command += ["--html", str(self.html_report)]
        return [*command, *PROFILES[self.profile]]

    def environment(self, base: Mapping[str, str]) -> dict[str, str]:
        env = {
            **base,
            "ZTBANK_LOAD_SVID": str(self.svid_dir.absolute()),
            "ZTBANK_LOAD_LOCUST_SUMMARY": "0",  # loadtest/report.py prints the summary
            **self.extra_env,
        }
        if self.victim_svid_dir is not None:
            env["ZTBANK_LOAD_VICTIM_SVID"] = str(self.victim_svid_dir.absolute())
        return env

    def describe(self) -> str:
        classes = " + ".join(PROFILES[self.profile])
        return (
            f"locust: profile {self.profile} ({classes}), {self.users} users,"
            f" {self.seconds}s against {self.host}"
        )

    def start(self, base: Mapping[str, str]) -> subprocess.Popen[bytes]:
        self.csv_prefix.parent.mkdir(parents=True, exist_ok=True)
        for suffix in CSV_SUFFIXES:  # never report a previous run's numbers
            self.csv_prefix.with_name(self.csv_prefix.name + suffix).unlink(missing_ok=True)
        return subprocess.Popen(self.command(), env=self.environment(base))

    def run(self, base: Mapping[str, str]) -> int:
        """Locust's exit status: 0, 1 if any request failed, other values if it broke."""
        with self.start(base) as process:
            try:
                return process.wait()
            except KeyboardInterrupt:
                process.terminate()
                process.wait()
                raise


def html_report_path(load_dir: Path, profile: str) -> Path:
    """A new report per run, beside the CSVs: ``$ZTBANK_HOME/load/PROFILE-YYYYmmddTHHMMSS.html``
    (the lab console lists them)."""
    return load_dir / f"{profile}-{time.strftime('%Y%m%dT%H%M%S')}.html"


def print_html_report(run: LocustRun) -> None:
    if run.html_report is not None and run.html_report.is_file():
        print(f"locust's HTML report: {run.html_report}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", default="mixed", choices=[p for p in PROFILES if p != "chaos"])
    parser.add_argument("--users", type=int, default=20, help="concurrent locust users")
    parser.add_argument("--duration", default="30s", help="run time, e.g. 30s or 2m (max 9m)")
    args = parser.parse_args(argv)
    try:
        if args.users < 1:
            raise LoadError(f"USERS={args.users}: at least one user")
        seconds = run_seconds(args.duration)
        settings = load_settings(StackSettings)
        env = stack_environment(settings)
        load_dir = settings.home / "load"
        svid = mint_teller_svid(load_dir / "teller", settings, env)
        print(f"minted {svid.spiffe_id} serial {svid.serial} valid until {svid.not_after}")
        run = LocustRun(
            profile=args.profile,
            users=args.users,
            seconds=seconds,
            host=gateway_url(settings),
            csv_prefix=load_dir / args.profile,
            svid_dir=svid.directory,
            html_report=html_report_path(load_dir, args.profile),
        )
    except (LoadError, CommonError) as error:
        print(f"make load: {error}", file=sys.stderr)
        return 2
    print(run.describe(), flush=True)
    status = run.run(env)
    print()
    reported = report(run.csv_prefix)
    print_html_report(run)
    # Locust's own status covers what the CSV cannot show (it crashed, a user raised).
    return reported or status


if __name__ == "__main__":
    raise SystemExit(main())
