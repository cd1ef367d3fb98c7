"""The labs of issue 11 (`ztbank lab policy`, `expiry`, `upstream`), each run as a trainer runs
it, on a native stack of this module's own.

That stack is not the session's: the policy lab edits the policy file the gateway watches, so
the stack gets a copy of infra/policy.json (the session's stack, and the other suites, read the
repository's file); and the upstream lab takes the root key offline.  Its signing CAs are the
default day-long ones: the upstream lab asks the issuer to renew now instead of waiting.  The
upstream lab on Vault runs in tests/e2e/test_vault_stack.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import load_settings
from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, sandbox_settings
from tests.e2e.conftest import SVID_TTL, E2EStack, _e2e_stack
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment

pytestmark = pytest.mark.e2e

LAB_TIMEOUT_SECONDS = 150
TELLER = "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/teller"


@pytest.fixture(scope="module")
def lab_stack() -> Iterator[E2EStack]:
    target = load_settings(E2ETargetSettings)
    if target.stack == "existing":
        pytest.skip("these labs change the stack (policy file, root key): sandbox stack only")
    env = pytest.MonkeyPatch()
    root = Path(tempfile.mkdtemp(prefix="ztl", dir="/tmp"))  # short: unix socket paths
    try:
        scrub_environment(env)
        # The labs edit these live: copies, never the repository's files.
        policy, trust = root / "policy.json", root / "trust-levels.json"
        shutil.copyfile(REPO_ROOT / "infra" / "policy.json", policy)
        shutil.copyfile(REPO_ROOT / "infra" / "trust-levels.json", trust)
        settings = sandbox_settings(root, SVID_TTL).model_copy(
            update={"policy": policy, "trust_levels": trust}
        )
        native = NativeStack(settings)
        try:
            native.up()
            yield _e2e_stack(target, settings, native)
        finally:
            native.down()
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def pids(stack: E2EStack) -> dict[str, int | None]:
    native = stack.controlled
    return {"issuer": native.issuer.pid()} | {n: p.pid() for n, p in native.services.items()}


def test_policy_lab_denies_a_route_live_and_restores_the_file(lab_stack: E2EStack) -> None:
    policy = lab_stack.settings.policy
    original = policy.read_bytes()
    before = pids(lab_stack)

    result = lab_stack.cli("lab", "policy", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"  1 the gateway watches {policy}" in out
    assert "  3 GET /v1/accounts refused after" in out
    assert "HTTP 403 application/problem+json" in out
    assert "    POST /v1/tokens still answers 201" in out
    assert f"  4 the gateway audited a deny: 'no policy rule allows {TELLER}" in out
    assert "  6 GET /v1/accounts served again after" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert result.stderr == ""
    assert policy.read_bytes() == original
    assert not (lab_stack.settings.run_dir / "lab-policy.original.json").exists()
    denies = [
        r
        for r in lab_stack.audit("gateway")
        if r["decision"] == "deny" and r["method"] == "GET /v1/accounts"
    ]
    assert denies
    assert denies[-1]["caller_spiffe_id"] == TELLER
    assert pids(lab_stack) == before
    assert lab_stack.teller().as_customer("alice", "GET", "/v1/accounts").status == 200


def interrupt_lab(stack: E2EStack, lab: str, when: str, signum: signal.Signals) -> str:
    """Run ``ztbank lab LAB``, send it ``signum`` once it printed a line starting with
    ``when``; its whole output once it has exited 130."""
    settings = stack.settings
    env = {
        "ZTBANK_HOME": str(settings.home),
        "ZTBANK_CERTS_DIR": str(settings.certs_dir),
        "ZTBANK_ISSUER_HTTP": settings.issuer_http,
        "ZTBANK_REGISTRY": str(settings.registry),
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ztbank")), "lab", lab],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(when):
            process.send_signal(signum)
            break
    seen.append(process.stdout.read())
    code = process.wait(timeout=30)
    out = "".join(seen)
    assert code == 130, out
    assert when in out
    assert "lab passed" not in out
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_policy_lab_interrupted_mid_edit_puts_the_policy_back(
    lab_stack: E2EStack, signum: signal.Signals
) -> None:
    policy = lab_stack.settings.policy
    original = policy.read_bytes()

    interrupt_lab(lab_stack, "policy", "  2 replaced the policy", signum)

    assert policy.read_bytes() == original
    assert not (lab_stack.settings.run_dir / "lab-policy.original.json").exists()
    assert lab_stack.teller().as_customer("alice", "GET", "/v1/accounts").status == 200


def test_upstream_lab_interrupted_puts_the_root_key_back(lab_stack: E2EStack) -> None:
    key = lab_stack.settings.certs_dir / "root-ca.key"
    original = key.read_bytes()

    interrupt_lab(lab_stack, "upstream", "  2 fault: the root CA's key offline", signal.SIGTERM)

    assert key.read_bytes() == original
    assert key.stat().st_mode & 0o777 == 0o600
    assert not key.with_name("root-ca.key.lab-offline").exists()


def test_expiry_lab_refuses_an_expired_svid_and_serves_a_new_one(lab_stack: E2EStack) -> None:
    result = lab_stack.cli("lab", "expiry", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "no Workload API stream renews it" in out
    assert "  2 served until -" in out
    assert "; refused from " in out
    assert "too EARLY" not in out
    assert "  3 the gateway audited a deny: 'TLS handshake failed" in out
    assert "certificate has expired" in out  # the rule that failed, not only VERIFY_FAILED
    assert "  4 a keep-alive connection opened before the expiry was closed " in out
    assert "  5 with a new SVID" in out
    assert "the client is served again on a new connection" in out
    assert "  6 the stack's own teller is still served" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert result.stderr == ""


def test_upstream_lab_serves_through_a_root_key_outage_and_recovers(lab_stack: E2EStack) -> None:
    key = lab_stack.settings.certs_dir / "root-ca.key"
    before = pids(lab_stack)
    issuer_log = lab_stack.controlled.issuer.log_file
    logged = len(issuer_log.read_text().splitlines())

    result = lab_stack.cli("lab", "upstream", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "  1 upstream disk: the issuer's CA chain is CN=ztbank issuer CA" in out
    assert f"  2 fault: the root CA's key offline ({key} moved aside)" in out
    assert "asked the issuer to renew its signing CA now" in out
    assert f"'CA maintenance failed, retrying in 1s: no root CA in {key.parent}" in out
    assert f"ztbank status: UPSTREAM FAILING: no root CA in {key.parent}" in out
    assert ", 0 refused; the trust bundle is unchanged: nothing unverified was issued" in out
    assert "the issuer's retry got its next signing CA after" in out
    assert ", chains to the pinned root" in out
    assert "the current signing CA signs: an SVID minted now" in out
    assert "no process of the bank was restarted" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert result.stderr == ""
    assert key.is_file()
    assert not key.with_name("root-ca.key.lab-offline").exists()
    assert pids(lab_stack) == before
    # The issuer's own record agrees: failures during the outage, then a new CA.
    messages = [
        str(json.loads(line).get("message", ""))
        for line in issuer_log.read_text().splitlines()[logged:]
        if line.startswith("{")
    ]
    failures = [i for i, m in enumerate(messages) if "CA maintenance failed" in m]
    assert failures
    assert any("signing CA set changed" in m for m in messages[failures[-1] :])
    assert lab_stack.cli("status").returncode == 0  # the upstream error is gone again
    lab_stack.wait_until_healthy(timeout=30)


def test_breaker_lab_trips_on_low_trust_and_closes_again(lab_stack: E2EStack) -> None:
    table = lab_stack.settings.trust_levels
    original = table.read_bytes()
    before = pids(lab_stack)

    result = lab_stack.cli("lab", "breaker", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "env/prod/zone/az1/team/payments -> 0.3" in out
    assert "  3 tripped; a read is answered in " in out
    assert "HTTP 503, \"the transfer-engine is unavailable: the gateway's circuit breaker" in out
    assert "    a transfer: HTTP 503" in out
    assert "    breaker_state 2" in out
    assert "    logged: closed -> open: score 0." in out  # 0.6 x 0.3 + 0.4 x lifetime left
    assert "open -> half_open, half_open -> closed" in out
    assert "  6 no service was restarted" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert table.read_bytes() == original
    assert pids(lab_stack) == before
