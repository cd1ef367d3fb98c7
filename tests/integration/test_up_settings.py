"""`make up` never silently ignores a setting, and a lab that cannot start changes nothing
(issue 21, items 3 and 4, and their bad input).

The issue's reproduction: ``ZTBANK_SVID_TTL=20s make up`` on a stack that already runs kept its
5-minute SVIDs and said nothing.  Here ``make up MODE=native`` runs on a private home
(``services.stack.sandbox``'s settings: a temp dir, free ports), once with 20-second SVIDs;
then ``make up`` asking for 5 minutes is refused in one line naming the difference and the
command that applies it, exit 2, and the stack is as it was: the same processes, the same
record, SVIDs of 20 s.  ``make up`` asking for nothing, or the same, goes on as before.

On that stack, ``make lab-NAME`` while another lab holds the lab lock, and ``make lab-nosuch``,
are refused in one line each before `make up` runs; ``ztbank lab`` on a home where no stack
runs too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.labs.support import LabLock
from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, sandbox_settings
from tests.support.helpers import clean_environment, scrub_environment, without_make_lines

pytestmark = [pytest.mark.integration, pytest.mark.stack]  # `make up` on a sandbox home

MAKE_TIMEOUT = 120.0
# Lines of make's, not ztbank's: which stack `make up` picked, and the recipe that failed.


def make(target: str, native: NativeStack, **env: str) -> subprocess.CompletedProcess[str]:
    """`make TARGET MODE=native` in this checkout, as an operator would run it, on ``native``'s
    home (its ZTBANK_* settings, and ``env``) with the venv running these tests, which make
    does not reinstall."""
    venv = Path(sys.executable).parents[1]
    command = ["make", "--no-print-directory", "-C", str(REPO_ROOT), target, f"VENV={venv}"]
    return subprocess.run(
        [*command, "-o", str(venv / ".installed"), "MODE=native"],
        env=clean_environment() | native.env | env,
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT,
        check=False,
    )


def refused_in_one_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 2; stdout empty; stderr is ztbank's one line (and make's own lines around it)."""
    transcript = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, transcript
    assert result.stdout == "", transcript
    assert "Traceback" not in result.stderr, transcript
    ours = without_make_lines(result.stderr)
    assert len(ours) == 1, transcript
    return ours[0]


def sandbox_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="zts", dir="/tmp"))  # short: unix socket paths


@pytest.fixture(scope="module")
def stack() -> Iterator[NativeStack]:
    """A native stack that `ZTBANK_SVID_TTL=20s make up` started; always down and removed."""
    if shutil.which("make") is None:
        pytest.skip("runs `make up`, and make is not installed")
    env = pytest.MonkeyPatch()
    scrub_environment(env)  # what the test itself starts inherits this environment
    root = sandbox_root()
    try:
        native = NativeStack(sandbox_settings(root))
        try:
            up = make("up", native, ZTBANK_SVID_TTL="20s")
            assert up.returncode == 0, f"stdout:\n{up.stdout}\nstderr:\n{up.stderr}"
            yield native
        finally:
            native.down()
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def pids(native: NativeStack) -> dict[str, int | None]:
    return {p.name: p.pid() for p in (native.issuer, *native.services.values())}


def svid_lifetimes(native: NativeStack) -> set[timedelta]:
    """How long each service's served SVID is valid, as its mTLS probe sees it."""
    lifetimes = set()
    for name, probe in native.status().services.items():
        assert probe.svid_not_before, (name, probe.error)
        assert probe.svid_not_after, (name, probe.error)
        not_before = datetime.fromisoformat(probe.svid_not_before)
        lifetimes.add(datetime.fromisoformat(probe.svid_not_after) - not_before)
    return lifetimes


def test_up_records_what_the_stack_runs_with(stack: NativeStack) -> None:
    record = json.loads((stack.settings.home / "upstream.json").read_text())
    assert record == {"upstream": "disk", "svid_ttl": "20s", "ca_ttl": "1d", "crl_ttl": "20s"}
    assert svid_lifetimes(stack) == {timedelta(seconds=20)}


def test_make_up_with_another_svid_ttl_is_refused_in_one_line_and_changes_nothing(
    stack: NativeStack,
) -> None:
    before = pids(stack)
    record = (stack.settings.home / "upstream.json").read_bytes()

    up = make("up", stack, ZTBANK_SVID_TTL="5m")

    assert refused_in_one_line(up) == (
        "ztbank: the running stack has SVIDs of 20s, not 5m:"
        " make down && ZTBANK_SVID_TTL=5m make up"
    )
    assert pids(stack) == before
    assert (stack.settings.home / "upstream.json").read_bytes() == record
    assert svid_lifetimes(stack) == {timedelta(seconds=20)}


@pytest.mark.parametrize("asked", [{}, {"ZTBANK_SVID_TTL": "20s"}, {"ZTBANK_CRL_TTL": "20s"}])
def test_make_up_asking_for_nothing_else_goes_on_as_before(
    stack: NativeStack, asked: dict[str, str]
) -> None:
    before = pids(stack)

    up = make("up", stack, **asked)

    assert up.returncode == 0, f"stdout:\n{up.stdout}\nstderr:\n{up.stderr}"
    assert up.stderr == "native stack (MODE=native)\n"
    assert pids(stack) == before


def test_a_lab_while_another_holds_the_lock_is_refused_before_make_up(
    stack: NativeStack,
) -> None:
    before = pids(stack)
    policy = stack.settings.policy.read_bytes()
    with LabLock.take(stack.settings, "outage", "cli") as lock:
        since = json.loads(lock.path.read_text())["since"]
        # Asking for other SVIDs as well: `make up` would refuse them; the lock is named first.
        lab = make("lab-policy", stack, ZTBANK_SVID_TTL="5m")
        held = lock.path.read_text()

    line = refused_in_one_line(lab)
    assert line.startswith("ztbank: lab 'outage' is running (since ")
    assert line.endswith(", started from the CLI): one lab at a time")
    assert json.loads(held)["since"] == since
    assert pids(stack) == before
    assert stack.settings.policy.read_bytes() == policy


def test_an_unknown_lab_is_refused_before_make_up_starts_anything() -> None:
    if shutil.which("make") is None:
        pytest.skip("runs `make`, and make is not installed")
    root = sandbox_root()
    try:
        native = NativeStack(sandbox_settings(root))

        lab = make("lab-nosuch", native)

        assert "argument NAME: invalid choice: 'nosuch'" in refused_in_one_line(lab)
        assert not native.settings.home.exists()  # no stack was started for it
        assert not native.settings.certs_dir.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_lab_on_a_stopped_stack_is_one_line_and_exit_2() -> None:
    root = sandbox_root()
    try:
        native = NativeStack(sandbox_settings(root))
        lab = subprocess.run(
            [str(Path(sys.executable).with_name("ztbank")), "lab", "revocation"],
            env=clean_environment() | native.env,
            capture_output=True,
            text=True,
            timeout=MAKE_TIMEOUT,
            check=False,
        )
        assert refused_in_one_line(lab) == (
            f"ztbank: no stack runs in ZTBANK_HOME={native.settings.home}: start it with"
            " `make up` in the checkout, or set ZTBANK_HOME to the home of a running stack"
        )
        assert not native.settings.home.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
