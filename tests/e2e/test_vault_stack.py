"""``make up UPSTREAM=vault`` on the native stack, as a user runs it: a real OpenBao server on
loopback TLS signs the issuer's CA, ``ztbank status`` shows the chain up to Vault's root and
Vault's state, the upstream lab passes on it, ``down``/``up`` keeps Vault's data and unseals it,
a Vault that cannot start leaves nothing running, and no secret shows anywhere.

A stack of this module's own (sandbox only: it starts and stops Vault).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from services.common.identity.workloads import TELLER
from services.common.settings import load_settings
from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_settings
from services.stack.vault import VaultError, vault_binary
from tests.e2e.conftest import SVID_TTL, E2EStack, _e2e_stack
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment

pytestmark = pytest.mark.e2e

LAB_TIMEOUT_SECONDS = 150


@pytest.fixture(scope="module")
def vault_stack() -> Iterator[E2EStack]:
    target = load_settings(E2ETargetSettings)
    if target.stack == "existing":
        pytest.skip("starts and stops a Vault of its own: sandbox stack only")
    try:
        vault_binary()
    except VaultError as missing:
        pytest.skip(f"no Vault server to run: {missing}")
    env = pytest.MonkeyPatch()
    root = Path(tempfile.mkdtemp(prefix="ztv", dir="/tmp"))  # short: unix socket paths
    try:
        scrub_environment(env)
        settings = sandbox_settings(root, SVID_TTL, upstream="vault")
        native = NativeStack(settings)
        try:
            native.up(timeout=60)
            yield _e2e_stack(target, settings, native)
        finally:
            native.down()
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


def _secrets(native: NativeStack) -> list[str]:
    init = json.loads(native.vault.init_file.read_text())
    approle = json.loads(native.vault.approle_file.read_text())
    return [
        init["root_token"],
        *init["unseal_keys_b64"],
        *init["unseal_keys_hex"],
        approle["secret_id"],
    ]


def test_the_issuers_ca_is_signed_by_vault_and_served_svids_chain_to_its_root(
    vault_stack: E2EStack,
) -> None:
    native = vault_stack.controlled
    result = vault_stack.cli("status", "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    authority = status["issuer"]["authority"]
    assert authority["upstream"] == "vault"
    assert authority["upstream_error"] == ""
    assert [c["subject"] for c in authority["ca_chain"]] == [
        "CN=ztbank issuer CA 1",
        "CN=ztbank intermediate CA",
        "CN=ztbank root CA",
    ]
    assert status["root_ca"] == str(native.vault.root_ca)
    assert status["vault"]["state"] == "active"
    assert status["vault"]["address"].startswith("https://127.0.0.1:")
    root = x509.load_pem_x509_certificate(native.vault.root_ca.read_bytes())
    assert authority["ca_chain"][-1]["serial"] == format(root.serial_number, "x")
    # What a workload is handed: leaf -> issuer CA -> Vault's pki_int -> Vault's root.
    svid = vault_stack.svid(TELLER.name)
    path = [*svid.chain, root]
    for child, parent in itertools.pairwise(path):
        child.verify_directly_issued_by(parent)
    assert len(svid.chain) == 3
    assert root in svid.bundle


def test_status_names_vault_and_the_chain_in_words(vault_stack: E2EStack) -> None:
    native = vault_stack.controlled
    result = vault_stack.cli("status")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "(vault upstream)" in result.stdout
    assert "chain CN=ztbank issuer CA 1 (" in result.stdout
    assert "<- CN=ztbank root CA (" in result.stdout
    assert f"vault            {native.vault.address}" in result.stdout
    assert " active (2." in result.stdout


def test_the_upstream_lab_passes_on_vault_and_puts_everything_back(
    vault_stack: E2EStack,
) -> None:
    native = vault_stack.controlled
    approle, pinned = native.vault.approle_file.read_bytes(), native.vault.tls.ca_cert.read_bytes()
    before = {"issuer": native.issuer.pid()} | {n: p.pid() for n, p in native.services.items()}

    result = vault_stack.cli("lab", "upstream", timeout=LAB_TIMEOUT_SECONDS)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "  1 upstream vault: the issuer's CA chain is CN=ztbank issuer CA" in out
    for fault, cause in (
        ("an AppRole secret Vault does not know", "Vault refused the AppRole login"),
        ("Vault's TLS certificate not signed by the pinned CA", "is not trusted by"),
        ("Vault sealed", "is sealed"),
        ("Vault stopped", "is unreachable"),
    ):
        assert f"fault: {fault}" in out
        assert f"ztbank status: UPSTREAM FAILING: {cause}" in out.replace(
            f"FAILING: Vault at {native.vault.address} ", "FAILING: "
        ).replace(f"FAILING: Vault's TLS certificate at {native.vault.address} ", "FAILING: ")
    assert out.count(", 0 refused; the trust bundle is unchanged") == 4
    assert out.count(", chains to the pinned root") == 4
    assert "no process of the bank was restarted" in out
    assert out.splitlines()[-2].startswith("lab passed")
    assert result.stderr == ""
    assert native.vault.approle_file.read_bytes() == approle
    assert native.vault.tls.ca_cert.read_bytes() == pinned
    assert not list(native.settings.run_dir.glob("lab-upstream-*"))
    assert {"issuer": native.issuer.pid()} | {
        n: p.pid() for n, p in native.services.items()
    } == before
    assert native.vault.health().state == "active"
    for secret in _secrets(native):
        assert secret not in out


def test_down_and_up_keep_vaults_data_and_unseal_it(vault_stack: E2EStack) -> None:
    native = vault_stack.controlled
    root, approle = native.vault.root_ca.read_bytes(), native.vault.approle_file.read_bytes()

    stopped = native.down()
    assert "vault" in stopped
    assert not native.vault.running()
    native.up(timeout=60)

    assert native.vault.health().state == "active"
    assert native.vault.root_ca.read_bytes() == root
    assert native.vault.approle_file.read_bytes() == approle
    vault_stack.wait_until_healthy(timeout=30)


def test_no_secret_of_vault_shows_in_logs_status_or_audit(vault_stack: E2EStack) -> None:
    native = vault_stack.controlled
    shown = [vault_stack.cli("status").stdout, vault_stack.cli("status", "--json").stdout]
    home = native.settings.home
    files = [*home.glob("log/*.log"), *home.glob("audit/*.jsonl"), native.vault.audit_file]
    shown += [path.read_text(errors="replace") for path in files]
    assert len(files) > 5
    for secret in _secrets(native):
        assert all(secret not in text for text in shown)


def test_a_vault_that_cannot_start_is_named_and_nothing_is_left_running(
    tmp_path: Path,
) -> None:
    if load_settings(E2ETargetSettings).stack == "existing":
        pytest.skip("starts a stack of its own: sandbox only")
    root = Path(tempfile.mkdtemp(prefix="ztv", dir="/tmp"))
    broken = tmp_path / "vault"
    broken.write_text("#!/bin/sh\necho 'vault: no such storage' >&2\nexit 1\n")
    broken.chmod(0o755)
    try:
        settings = sandbox_settings(root, SVID_TTL, upstream="vault")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ZTBANK_", "VAULT_"))},
            "ZTBANK_HOME": str(settings.home),
            "ZTBANK_CERTS_DIR": str(settings.certs_dir),
            "ZTBANK_REGISTRY": str(settings.registry),
            "ZTBANK_ISSUER_HTTP": settings.issuer_http,
            "ZTBANK_VAULT_PORT": str(settings.vault_port),
            "ZTBANK_VAULT_CLUSTER_PORT": str(settings.vault_cluster_port),
            "VAULT_BIN": str(broken),
        }
        result = subprocess.run(
            [str(Path(sys.executable).with_name("ztbank")), "up", "--upstream", "vault"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert result.returncode == 1
        assert result.stderr.startswith("ztbank: vault exited during start-up")
        assert str(settings.home / "log" / "vault.log") in result.stderr
        assert "vault: no such storage" in result.stderr
        assert "Traceback" not in result.stderr
        native = NativeStack(settings)
        assert not native.issuer.running()
        assert not native.vault.running()
        assert not any(p.running() for p in native.services.values())
    finally:
        shutil.rmtree(root, ignore_errors=True)
