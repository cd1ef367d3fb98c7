"""The Vault bootstrap and VaultUpstream against a real Vault server.

Runs only with VAULT_ADDR and VAULT_TOKEN set (plus VAULT_CACERT for a private CA), e.g. against
``vault server -config=...`` after ``vault operator init``/``unseal``.  The token needs root-like
rights: the bootstrap mounts engines, writes policies and enables AppRole.
"""

from __future__ import annotations

import itertools
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.identity.spiffe_id import DEFAULT_TRUST_DOMAIN
from services.issuer.adapters.upstream import SignedCA
from services.issuer.adapters.upstream_vault import VaultAuth, VaultUpstream
from services.issuer.errors import UpstreamError
from tests.support.vault_bootstrap import load_bootstrap_script

pytestmark = [
    pytest.mark.vault,
    pytest.mark.skipif(
        not (os.environ.get("VAULT_ADDR") and os.environ.get("VAULT_TOKEN")),
        reason="needs a real Vault: set VAULT_ADDR and VAULT_TOKEN",
    ),
]


@pytest.fixture(scope="module")
def approle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vault")
    argv = [
        "--vault-addr",
        os.environ["VAULT_ADDR"],
        "--trust-domain",
        DEFAULT_TRUST_DOMAIN,
        "--init-file",
        str(directory / "init.json"),
        "--approle-out",
        str(directory / "approle.json"),
    ]
    assert load_bootstrap_script().main(argv) == 0
    return directory / "approle.json"


def _upstream(approle_file: Path, pki_mount: str = "pki_int") -> VaultUpstream:
    credentials = json.loads(approle_file.read_text())
    return VaultUpstream(
        os.environ["VAULT_ADDR"],
        pki_mount=pki_mount,
        auth=VaultAuth(role_id=credentials["role_id"], secret_id=credentials["secret_id"]),
        ca_cert=os.environ.get("VAULT_CACERT"),
    )


def _csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ztbank issuer CA (live test)")])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _assert_chains_to_a_root(signed: SignedCA) -> None:
    path = [signed.certificate, *signed.chain]
    for child, parent in itertools.pairwise(path):
        child.verify_directly_issued_by(parent)
    for root in signed.roots:
        root.verify_directly_issued_by(root)
    anchors = [root for root in signed.roots if root.subject == path[-1].issuer]
    assert anchors, "no returned root issued the top of the chain"
    path[-1].verify_directly_issued_by(anchors[0])


def test_bootstrapped_vault_signs_the_issuer_ca(approle_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    signed = _upstream(approle_file).sign_signing_ca(
        _csr(key), trust_domain=DEFAULT_TRUST_DOMAIN, ttl=timedelta(hours=1)
    )

    assert signed.certificate.public_key() == key.public_key()
    constraints = signed.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    sans = signed.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{DEFAULT_TRUST_DOMAIN}"]
    assert signed.chain, "pki_int's certificate belongs between the issuer CA and the root"
    _assert_chains_to_a_root(signed)


def test_bootstrap_run_again_changes_nothing(
    approle_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = approle_file.read_text()
    capsys.readouterr()
    argv = [
        "--vault-addr",
        os.environ["VAULT_ADDR"],
        "--init-file",
        str(approle_file.with_name("init.json")),
        "--approle-out",
        str(approle_file),
    ]

    assert load_bootstrap_script().main(argv) == 0

    assert "changed" not in capsys.readouterr().out
    assert approle_file.read_text() == credentials


def test_issuer_approle_cannot_sign_with_the_root(approle_file: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    with pytest.raises(UpstreamError, match="denied"):
        _upstream(approle_file, pki_mount="pki").sign_signing_ca(
            _csr(key), trust_domain=DEFAULT_TRUST_DOMAIN, ttl=timedelta(hours=1)
        )
