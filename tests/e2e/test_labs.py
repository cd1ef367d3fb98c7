"""The labs (`ztbank lab policy`, `expiry`, `upstream`, `breaker`), each run as a trainer runs
it: on a native stack of this module's own, or beside the compose stack (`make test-compose`).

The native stack is not the session's: the policy lab edits the policy file the gateway
watches, so the stack gets a copy of infra/policy.json (the session's stack, and the other
suites, read the repository's file); and the upstream lab takes the root key offline.  Its
signing CAs are the default day-long ones: the upstream lab asks the issuer to renew now
instead of waiting.  The upstream lab on a native Vault runs in tests/e2e/test_vault_stack.py;
on the compose stack's Vault it runs here.  Beside the compose stack the labs run as its `lab`
job does (compose.yaml's x-stack-observer), and edit the live-config volume the services watch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import load_settings
from services.labs.support import issuer_started, service_starts
from services.stack.native import NativeStack, StackSettings
from services.stack.sandbox import free_port, sandbox_settings
from tests.e2e.conftest import SVID_TTL, E2EStack, _e2e_stack
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment, wait_until

pytestmark = pytest.mark.e2e

LAB_TIMEOUT_SECONDS = 150
TELLER = "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/teller"


@pytest.fixture(scope="module")
def lab_stack() -> Iterator[E2EStack]:
    target = load_settings(E2ETargetSettings)
    if target.stack == "existing":
        settings = load_settings(StackSettings)
        if settings.stack_kind != "compose":
            pytest.skip("these labs change the stack (policy file, root key): not a shared one")
        existing = _e2e_stack(target, settings, None)
        existing.wait_until_healthy(target.ready_timeout)
        yield existing
        return
    env = pytest.MonkeyPatch()
    root = Path(tempfile.mkdtemp(prefix="ztl", dir="/tmp"))  # short: unix socket paths
    try:
        scrub_environment(env)
        # The labs edit the policy and trust table live: the sandbox's own copies.
        settings = sandbox_settings(root, SVID_TTL)
        native = NativeStack(settings)
        try:
            native.up()
            yield _e2e_stack(target, settings, native)
        finally:
            native.down()
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def starts(stack: E2EStack) -> dict[str, object]:
    """When the issuer and each service started: the same later means none was restarted."""
    return {"issuer": issuer_started(stack.settings), **service_starts(stack.settings)}


def on_compose(stack: E2EStack) -> bool:
    return stack.settings.stack_kind == "compose"


def test_policy_lab_denies_a_route_live_and_restores_the_file(lab_stack: E2EStack) -> None:
    policy = lab_stack.settings.policy
    original = policy.read_bytes()
    owner_and_mode = (policy.stat().st_uid, policy.stat().st_gid, policy.stat().st_mode)
    before = starts(lab_stack)

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
    assert (policy.stat().st_uid, policy.stat().st_gid, policy.stat().st_mode) == owner_and_mode
    assert not (lab_stack.settings.run_dir / "lab-policy.original.json").exists()
    denies = [
        r
        for r in lab_stack.audit("gateway")
        if r["decision"] == "deny" and r["method"] == "GET /v1/accounts"
    ]
    assert denies
    assert denies[-1]["caller_spiffe_id"] == TELLER
    assert starts(lab_stack) == before
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
    if on_compose(lab_stack):
        pytest.skip("the compose stack's upstream is Vault: no root key on disk")
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
    if on_compose(lab_stack):
        pytest.skip("the compose stack's upstream is Vault: no root key on disk")
    key = lab_stack.settings.certs_dir / "root-ca.key"
    before = starts(lab_stack)
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
    assert starts(lab_stack) == before
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
    before = starts(lab_stack)

    result = lab_stack.cli("lab", "breaker", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "env/prod/zone/az1/team/payments -> 0.3" in out
    assert "  3 tripped; a read is answered in " in out
    assert "HTTP 503, \"the transfer-engine is unavailable: the gateway's circuit breaker" in out
    assert "    a transfer: HTTP 503" in out
    assert "    breaker_state 2" in out
    assert "    breaker_transitions_total counted closed -> open x1" in out
    assert "open -> half_open x1, half_open -> closed x1" in out
    assert "  6 no service was restarted" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert table.read_bytes() == original
    assert starts(lab_stack) == before


def test_upstream_lab_on_the_compose_stacks_vault(lab_stack: E2EStack) -> None:
    """Beside the compose stack: three Vault faults (no Docker in the lab's container to stop
    Vault's), each named, served through, undone with the files' owners kept."""
    if not on_compose(lab_stack):
        pytest.skip("the native stack's Vault upstream lab runs in test_vault_stack.py")
    vault_dir, tls_dir = lab_stack.settings.vault_dir, lab_stack.settings.vault_tls_dir
    assert vault_dir is not None
    assert tls_dir is not None
    approle, pinned_ca = vault_dir / "approle.json", tls_dir / "ca.pem"
    files = {path: (path.read_bytes(), path.stat()) for path in (approle, pinned_ca)}
    before = starts(lab_stack)

    result = lab_stack.cli("lab", "upstream", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "  1 upstream vault: the issuer's CA chain is CN=ztbank issuer CA" in out
    assert "  2 fault: an AppRole secret Vault does not know" in out
    assert "  3 fault: Vault's TLS certificate not signed by the pinned CA" in out
    assert "  4 fault: Vault sealed (sealed with the demo init file's root token)" in out
    assert "Vault stopped" not in out
    assert out.count("    ztbank status: UPSTREAM FAILING: ") == 3
    assert out.count(", 0 refused; the trust bundle is unchanged") == 3
    assert out.count(", chains to the pinned root") == 3
    assert "no process of the bank was restarted" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert result.stderr == ""
    for path, (content, stat) in files.items():
        assert path.read_bytes() == content
        now = path.stat()
        assert (now.st_uid, now.st_gid, now.st_mode) == (stat.st_uid, stat.st_gid, stat.st_mode)
    assert starts(lab_stack) == before
    lab_stack.wait_until_healthy(timeout=30)


def test_the_console_beside_the_compose_stack_shows_it_and_runs_a_lab(
    lab_stack: E2EStack,
) -> None:
    """`make console` on compose runs `ztbank console` in the `console` job: the same page,
    fed from the services' volumes, its own SVID by the console's uid, labs started there."""
    if not on_compose(lab_stack):
        pytest.skip("the native console runs in tests/browser and tests/unit/console")
    port = free_port()
    console = subprocess.Popen(
        [str(Path(sys.executable).with_name("ztbank")), "console"],
        env={**os.environ, "ZTBANK_CONSOLE_PORT": str(port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        state = wait_until(
            lambda: _console_state(base, up=True),
            timeout=60,
            message="the console never saw the stack up",
        )
        stack = state["state"]["stack"]
        assert all(s["healthy"] for s in stack["services"].values()), stack["services"]
        assert stack["vault"]["state"] == "active"
        chain = stack["issuer"]["authority"]["ca_chain"]
        assert len(chain) >= 3, chain  # the issuer's CA, Vault's pki_int, Vault's root
        assert state["state"]["console"]["svid_serial"]
        assert {d["service"] for d in state["decisions"]} >= {"gateway"}

        request = urllib.request.Request(
            f"{base}/api/labs/revocation", method="POST", headers={"x-ztbank-console": "start"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 202
        done = wait_until(
            lambda: _console_state(base, lab_ended=True),
            timeout=LAB_TIMEOUT_SECONDS,
            message="the lab started from the console did not end",
        )
        lab = done["lab"]
        assert lab["verdict"] == "passed", "\n".join(lab["lines"])
        assert lab["lines"][-1].startswith("lab passed: the revoked client was cut off within")
    finally:
        console.terminate()
        output, _ = console.communicate(timeout=30)
    assert "Traceback" not in output, output


def _console_state(
    base: str, *, up: bool = False, lab_ended: bool = False
) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"{base}/api/state", timeout=10) as reply:
            state: dict[str, Any] = json.load(reply)
    except OSError:
        return None
    if up and not (state["state"]["up"] and state["decisions"]):
        return None
    if lab_ended and (state["lab"] is None or state["lab"]["verdict"] is None):
        return None
    return state
