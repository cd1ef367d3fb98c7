"""scripts/test_compose.sh (``make test-compose``) against a fake ``docker`` that records calls.

No Docker engine runs on our machines, so what is checked here is the script's own logic: the
order of the compose calls, the stack's settings, the teardown that always happens and the exit
code that is kept.  Whether the stack itself comes up is not (and cannot be) checked here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.helpers import clean_environment

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "test_compose.sh"
FAKE_DOCKER = """#!/bin/sh
printf '%s|%s|%s|%s\\n' "$COMPOSE_PROJECT_NAME" "$ZTBANK_SVID_TTL" "${GATEWAY_PORT-unset}" "$*" \\
    >> "$FAKE_DOCKER_LOG"
case " $* " in
    *" up "*) exit "${FAKE_UP_RC:-0}" ;;
    *" run "*) exit "${FAKE_RUN_RC:-0}" ;;
esac
"""


@dataclass(frozen=True)
class Call:
    project: str
    svid_ttl: str
    gateway_port: str
    args: str


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    calls: list[Call]

    def index(self, fragment: str) -> int:
        return next(i for i, c in enumerate(self.calls) if fragment in c.args)


def run_script(tmp_path: Path, *args: str, up_rc: int = 0, run_rc: int = 0) -> Run:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    env = clean_environment() | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DOCKER_LOG": str(log),
        "FAKE_UP_RC": str(up_rc),
        "FAKE_RUN_RC": str(run_rc),
    }
    done = subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    calls = [Call(*line.split("|", 3)) for line in log.read_text().splitlines()]
    return Run(done.returncode, done.stderr, calls)


def test_green_run_brings_the_stack_up_runs_the_suites_and_tears_down(tmp_path: Path) -> None:
    run = run_script(tmp_path)
    assert run.returncode == 0, run.stderr
    up, suites, down = run.index(" up "), run.index(" run "), run.index(" down ")
    assert up < suites < down
    assert "--wait" in run.calls[up].args
    assert "--rm e2e tests/e2e" in run.calls[suites].args
    assert "--volumes" in run.calls[down].args
    assert {c.project for c in run.calls} == {"ztbank-e2e"}  # not the demo stack's "ztbank"
    assert {c.svid_ttl for c in run.calls} == {"20s"}  # rotation fits the suite's deadline
    assert {c.gateway_port for c in run.calls} == {""}  # Docker picks the host ports


@pytest.mark.parametrize("suites_rc", [1, 3])
def test_failing_suites_keep_their_exit_code_and_still_tear_down(
    tmp_path: Path, suites_rc: int
) -> None:
    run = run_script(tmp_path, run_rc=suites_rc)
    assert run.returncode == suites_rc
    assert run.index(" run ") < run.index(" down ")
    assert "--volumes" in run.calls[-1].args


def test_a_stack_that_never_gets_healthy_fails_without_running_the_suites(tmp_path: Path) -> None:
    run = run_script(tmp_path, up_rc=1)
    assert run.returncode == 1
    assert not any(" run " in f" {c.args} " for c in run.calls)
    assert "did not come up healthy" in run.stderr
    assert " logs " in f" {run.calls[-2].args} "  # the logs say why, before the teardown
    assert "down --volumes" in run.calls[-1].args


def test_pytest_arguments_are_passed_to_the_suites(tmp_path: Path) -> None:
    run = run_script(tmp_path, "-k", "rotation", "-x")
    assert run.calls[run.index(" run ")].args.endswith(
        "tests/e2e -p no:cacheprovider -rs -k rotation -x"
    )
