"""`make class` (issue 21, item 1): the native stack restarted with the class profile, which it
says, balances kept.

Here `make up MODE=native` starts a stack with the default lifetimes on a private home
(``services.stack.sandbox``'s settings: a temp dir, free ports), a transfer moves money, then
`make class` runs on that home: it prints the profile's values and why, stops the stack and
starts it again, and what the issuer really issues afterwards is checked: an SVID of 20 s (the
teller's from its Workload API, and each service's as its mTLS probe sees it), CRLs valid for
20 s, the record of the stack's settings; the balance is the one the transfer left.  `make
class` while a lab runs is refused in one line and restarts nothing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography import x509

from services.common.identity.workloads import TELLER
from services.issuer.domain.revocation import crls_url
from services.labs.breaker import Bank
from services.labs.support import LabLock
from services.stack.native import NativeStack, workload_svid
from services.stack.sandbox import REPO_ROOT, sandbox_settings
from tests.support.helpers import clean_environment, scrub_environment, without_make_lines

pytestmark = [pytest.mark.integration, pytest.mark.stack]  # `make up`, `make class`

MAKE_TIMEOUT = 120.0
CLASS_RECORD = {"upstream": "disk", "svid_ttl": "20s", "ca_ttl": "1d", "crl_ttl": "20s"}
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def make(target: str, native: NativeStack, **env: str) -> subprocess.CompletedProcess[str]:
    """`make TARGET MODE=native` in this checkout, as a trainer would run it, on ``native``'s
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


def transcript(result: subprocess.CompletedProcess[str]) -> str:
    return f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@dataclass(frozen=True)
class Stack:
    native: NativeStack
    opening_balance: Decimal
    balance: Decimal  # after the transfer the fixture made


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """A native stack that a plain `make up` started (5-minute SVIDs), with money moved on it;
    always down and removed."""
    if shutil.which("make") is None:
        pytest.skip("runs `make up` and `make class`, and make is not installed")
    env = pytest.MonkeyPatch()
    scrub_environment(env)  # what the test itself starts inherits this environment
    root = Path(tempfile.mkdtemp(prefix="ztc", dir="/tmp"))  # short: unix socket paths
    try:
        native = NativeStack(sandbox_settings(root))
        try:
            up = make("up", native)
            assert up.returncode == 0, transcript(up)
            assert svid_lifetimes(native) == {timedelta(minutes=5)}
            bank = Bank(native.settings)
            opening = bank.balance()
            assert opening is not None
            moved = bank.transfer()
            assert moved.status in (200, 201), moved.body
            balance = bank.balance()
            assert balance == opening - Decimal("1.00")
            yield Stack(native, opening, balance)
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


def crl_validities(native: NativeStack) -> set[timedelta]:
    """thisUpdate..nextUpdate of each CRL the issuer serves now."""
    with urllib.request.urlopen(crls_url(native.settings.issuer_url), timeout=10) as reply:
        pem = reply.read()
    validities = set()
    for block in _PEM_CRL.findall(pem):
        crl = x509.load_pem_x509_crl(block)
        assert crl.next_update_utc is not None
        validities.add(crl.next_update_utc - crl.last_update_utc)
    return validities


def test_make_class_restarts_the_stack_with_the_profile_and_keeps_the_balances(
    stack: Stack,
) -> None:
    native = stack.native
    before = pids(native)

    result = make("class", native)

    assert result.returncode == 0, transcript(result)
    out = result.stdout.splitlines()
    assert out[0] == "class profile: the issuer lifetimes under which every lab runs in seconds"
    for assignment in ("ZTBANK_SVID_TTL=20s", "ZTBANK_CRL_TTL=20s", "ZTBANK_CA_TTL=1d"):
        assert any(line.startswith(f"  {assignment}  ") for line in out), result.stdout
    assert "  stopped: gateway, transfer-engine, risk, issuer" in out
    assert any(line.startswith("  the issuer issues SVIDs of 20 s now") for line in out)
    assert out[-1].startswith("class stack ready")
    assert result.stderr == "", result.stderr
    after = pids(native)
    assert all(after[name] not in (None, pid) for name, pid in before.items()), after

    # What the issuer really issues now.
    assert workload_svid(native.settings, TELLER.name).lifetime == timedelta(seconds=20)
    assert svid_lifetimes(native) == {timedelta(seconds=20)}
    assert crl_validities(native) == {timedelta(seconds=20)}
    record = json.loads((native.settings.home / "upstream.json").read_text())
    assert record == CLASS_RECORD
    # Nothing was wiped: the transfer made before `make class` is still there.
    assert Bank(native.settings).balance() == stack.balance != stack.opening_balance


def test_lifetimes_of_the_environment_are_named_and_not_used(stack: Stack) -> None:
    native = stack.native

    result = make("class", native, ZTBANK_SVID_TTL="5m", ZTBANK_CRL_TTL="5m")

    assert result.returncode == 0, transcript(result)
    out = result.stdout.splitlines()
    assert "  (the environment's ZTBANK_SVID_TTL=5m is not used: the profile's is)" in out
    assert "  (the environment's ZTBANK_CRL_TTL=5m is not used: the profile's is)" in out
    assert workload_svid(native.settings, TELLER.name).lifetime == timedelta(seconds=20)
    assert json.loads((native.settings.home / "upstream.json").read_text()) == CLASS_RECORD


def test_make_class_while_a_lab_runs_is_refused_in_one_line_and_restarts_nothing(
    stack: Stack,
) -> None:
    native = stack.native
    before = pids(native)
    with LabLock.take(native.settings, "outage", "cli"):
        result = make("class", native)

    assert result.returncode == 2, transcript(result)
    assert result.stdout == ""
    ours = without_make_lines(result.stderr)
    assert len(ours) == 1, transcript(result)
    assert ours[0].startswith("ztbank: lab 'outage' is running (since ")
    assert ours[0].endswith(", started from the CLI): one lab at a time")
    assert pids(native) == before
