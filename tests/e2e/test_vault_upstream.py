"""The issuer's upstream is Vault: what workloads are served chains up to Vault's root, and Vault's
own audit log shows the issuer asking for its CA under its policy, with no secret in clear.

Runs where the ZTBANK_E2E_VAULT_* settings say where Vault and its files are (``make
test-compose``: the e2e container mounts the vault-tls, vault-bootstrap and vault-logs volumes);
skipped elsewhere.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.common.identity.workloads import SERVICES
from services.common.identity.x509svid import verify_x509_svid
from tests.e2e.conftest import E2EStack, read_jsonl

pytestmark = pytest.mark.e2e

ISSUER_POLICY = "ztbank-issuer"  # infra/vault/bootstrap.py
SIGN_PATH = "pki_int/root/sign-intermediate"
LOGIN_PATH = "auth/approle/login"
HASHED = "hmac-sha256:"
# Fields of Vault's audit records that hold a token, an accessor or an AppRole credential.
SECRET_FIELDS = ("client_token", "accessor", "client_token_accessor", "secret_id", "role_id")


@pytest.fixture(scope="module")
def vault_files(stack: E2EStack) -> Path:
    target = stack.target
    if not (target.vault_addr and target.vault_bootstrap_dir and target.vault_audit_log):
        pytest.skip("needs a stack whose issuer Vault signs, its files mounted (make test-compose)")
    return Path(target.vault_bootstrap_dir)


def vault_root(vault_files: Path) -> x509.Certificate:
    (root,) = x509.load_pem_x509_certificates((vault_files / "root-ca.pem").read_bytes())
    return root


def pki_int_ca(stack: E2EStack) -> x509.Certificate:
    """pki_int's CA certificate as Vault serves it (unauthenticated), over Vault's TLS."""
    context = ssl.create_default_context(cafile=stack.target.vault_cacert or None)
    url = f"{stack.target.vault_addr}/v1/pki_int/ca/pem"
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        return x509.load_pem_x509_certificate(reply.read())


def self_signed(certificate: x509.Certificate) -> bool:
    if certificate.subject != certificate.issuer:
        return False
    certificate.verify_directly_issued_by(certificate)
    return True


@pytest.mark.parametrize("workload", [w.name for w in SERVICES])
def test_a_served_svid_chains_up_to_vaults_root_which_is_the_bundles_only_root(
    stack: E2EStack, vault_files: Path, workload: str
) -> None:
    root = vault_root(vault_files)
    pki_int = pki_int_ca(stack)
    svid = stack.svid(workload)

    roots = [c for c in svid.bundle if self_signed(c)]
    assert roots == [root], "the bundle's one root is the one vault-bootstrap wrote"

    leaf, issuer_ca, *upstream = svid.chain
    assert upstream == [pki_int], "the SVID carries pki_int's CA as Vault serves it"
    leaf.verify_directly_issued_by(issuer_ca)
    issuer_ca.verify_directly_issued_by(pki_int)
    pki_int.verify_directly_issued_by(root)
    assert issuer_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The whole path by the SPIFFE rules, with Vault's root as the only trust anchor.
    assert verify_x509_svid(list(svid.chain), [root], trust_domain=stack.trust_domain) == (
        svid.spiffe_id
    )
    assert str(svid.spiffe_id) == stack.spiffe_id(workload)


def secret_values(node: object) -> Iterator[tuple[str, object]]:
    """Every (field, value) of SECRET_FIELDS anywhere in an audit record."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_FIELDS:
                yield key, value
            yield from secret_values(value)
    elif isinstance(node, list):
        for item in node:
            yield from secret_values(item)


def test_vaults_audit_log_shows_the_issuer_signing_under_its_policy_with_secrets_hashed(
    stack: E2EStack, vault_files: Path
) -> None:
    log = Path(stack.target.vault_audit_log)
    records: list[dict[str, Any]] = read_jsonl(log)
    requests = [r for r in records if r["type"] == "request"]

    signs = [r for r in requests if r["request"]["path"] == SIGN_PATH]
    assert signs, f"no {SIGN_PATH} request in {log}"
    for record in signs:
        auth = record["auth"]
        assert auth["display_name"] == "approle"
        assert auth["metadata"] == {"role_name": ISSUER_POLICY}
        assert ISSUER_POLICY in auth["policies"]
        granting = [p["name"] for p in auth["policy_results"]["granting_policies"]]
        assert granting == [ISSUER_POLICY], "allowed by the issuer's policy, not root"
    logins = [r for r in requests if r["request"]["path"] == LOGIN_PATH]
    assert logins, f"no AppRole login in {log}"
    assert all(r["request"]["data"]["secret_id"].startswith(HASHED) for r in logins)

    found = [(key, value) for record in records for key, value in secret_values(record)]
    assert {key for key, _ in found} >= {"client_token", "accessor", "secret_id", "role_id"}
    clear = [(key, value) for key, value in found if not str(value).startswith(HASHED)]
    assert clear == []
    text = log.read_text()
    approle = json.loads((vault_files / "approle.json").read_text())
    init = json.loads((vault_files / "init.json").read_text())
    for name, secret in (
        ("the issuer's secret_id", approle["secret_id"]),
        ("the issuer's role_id", approle["role_id"]),
        ("the root token", init["root_token"]),
        *(("an unseal key", key) for key in init["unseal_keys_b64"]),
    ):
        assert secret not in text, f"{name} is in clear in {log}"
