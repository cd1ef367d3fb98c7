"""VaultUpstream against a Vault mocked at the HTTP boundary, one that really signs the CSR (and,
for TLS and refused connections, against real sockets)."""

from __future__ import annotations

import json
import logging
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import requests_mock as rm
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.identity.pem import fingerprint_sha256
from services.common.settings import load_settings
from services.issuer.adapters.upstream.vault import VaultAuth, VaultUpstream
from services.issuer.errors import UpstreamError
from services.issuer.server import build_upstream
from services.issuer.settings import IssuerSettings
from tests.support.pki import KeyUsageSpec, create_root_ca
from tests.support.vault_pki import (
    Signing,
    TlsFiles,
    VaultPki,
    pem,
    serve_fake_vault,
    signer_callback,
)

ADDR = "https://vault.test:8200"
TRUST_DOMAIN = "bank.test"
ROLE_ID = "role-id-0001"
SECRET_ID = "secret-id-do-not-leak"
LOGIN_TOKENS = ("hvs.first-login-token", "hvs.second-login-token")
STATIC_TOKEN = "hvs.static-token-do-not-leak"
UNSEAL_KEY = "unseal-key-do-not-leak"
SECRETS = (SECRET_ID, STATIC_TOKEN, UNSEAL_KEY, *LOGIN_TOKENS)
SIGN_URL = f"{ADDR}/v1/pki_int/root/sign-intermediate"
LOGIN_URL = f"{ADDR}/v1/auth/approle/login"
ROOT_URL = f"{ADDR}/v1/pki/ca/pem"
HOUR = timedelta(hours=1)
WHERE = f"pki_int/root/sign-intermediate at {ADDR}"
SIGNED = f"the CA signed by {WHERE}"


@pytest.fixture(scope="module")
def pki() -> VaultPki:
    return VaultPki.create()


@pytest.fixture(scope="module")
def evil() -> VaultPki:
    """Another hierarchy: what a Vault whose pki mount was replaced (or an impostor) signs with."""
    return VaultPki.create(name="evil")


@pytest.fixture
def root_file(tmp_path: Path, pki: VaultPki) -> Path:
    return pki.write_root(tmp_path / "vault-root.pem")


@pytest.fixture
def issuer_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(
    key: ec.EllipticCurvePrivateKey, common_name: str | None
) -> x509.CertificateSigningRequest:
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


@pytest.fixture
def csr(issuer_key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return _csr(issuer_key, "ztbank issuer CA")


def _login_responses(*tokens: str) -> list[dict[str, Any]]:
    return [{"json": {"auth": {"client_token": token, "lease_duration": 3600}}} for token in tokens]


def _approle() -> VaultAuth:
    return VaultAuth(role_id=ROLE_ID, secret_id=SECRET_ID)


def _write_approle(path: Path, role_id: str = ROLE_ID, secret_id: str = SECRET_ID) -> Path:
    path.write_text(json.dumps({"role_id": role_id, "secret_id": secret_id}))
    path.chmod(0o600)
    return path


def _upstream(root_file: Path, auth: VaultAuth | None = None, **kwargs: Any) -> VaultUpstream:
    return VaultUpstream(
        kwargs.pop("address", ADDR), auth=auth or _approle(), pinned_roots_file=root_file, **kwargs
    )


def _calls(requests_mock: rm.Mocker, url: str) -> list[Any]:
    return [call for call in requests_mock.request_history if call.url == url]


def _vault(requests_mock: rm.Mocker, pki: VaultPki, signing: Signing | None = None) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(*LOGIN_TOKENS))
    requests_mock.post(SIGN_URL, json=signer_callback(pki, signing))


def _refusal(
    upstream: VaultUpstream, csr: x509.CertificateSigningRequest, ttl: timedelta = HOUR
) -> str:
    """The message of the UpstreamError signing raises: one line, no secret, no chained cause."""
    with pytest.raises(UpstreamError) as caught:
        upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=ttl)
    message = str(caught.value)
    assert "\n" not in message
    assert not [secret for secret in SECRETS if secret in message]
    assert caught.value.__cause__ is None
    return message


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- what a good answer gives ------------------------------------------------------------------


def test_approle_login_then_sign_returns_the_pinned_root(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    _vault(requests_mock, pki)

    signed = _upstream(root_file).sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    (login,) = _calls(requests_mock, LOGIN_URL)
    assert login.json() == {"role_id": ROLE_ID, "secret_id": SECRET_ID}
    (sign,) = _calls(requests_mock, SIGN_URL)
    assert sign.headers["X-Vault-Token"] == LOGIN_TOKENS[0]
    body = sign.json()
    assert x509.load_pem_x509_csr(body["csr"].encode()) == csr
    assert body["common_name"] == "ztbank issuer CA"
    assert body["uri_sans"] == f"spiffe://{TRUST_DOMAIN}"
    assert body["ttl"] == "3600s"
    assert body["max_path_length"] == 0
    assert body["use_csr_values"] is False
    assert body["format"] == "pem"

    assert signed.certificate.public_key() == csr.public_key()
    assert signed.certificate.issuer == pki.intermediate.certificate.subject
    assert signed.chain == (pki.intermediate.certificate,)
    assert signed.roots == (pki.root.certificate,)
    assert not _calls(requests_mock, ROOT_URL)


def test_ca_chain_without_the_root_ends_at_the_pinned_root_without_asking_vault(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(
        f"{ADDR}/v1/ztbank_int/root/sign-intermediate",
        json=signer_callback(pki, Signing(include_root=False)),
    )

    signed = _upstream(root_file, pki_mount="ztbank_int", root_mount="ztbank_root").sign_signing_ca(
        csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(minutes=90)
    )

    assert signed.chain == (pki.intermediate.certificate,)
    assert signed.roots == (pki.root.certificate,)
    assert requests_mock.request_history[1].json()["ttl"] == "5400s"
    assert len(requests_mock.request_history) == 2  # no read of ztbank_root/ca/pem


def test_only_the_pinned_root_that_signs_is_returned(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    both = tmp_path / "roots.pem"
    both.write_text(pem(evil.root.certificate, pki.root.certificate))
    _vault(requests_mock, pki)

    signed = _upstream(both).sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert signed.roots == (pki.root.certificate,)


def test_static_token_is_sent_without_login(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(SIGN_URL, json=signer_callback(pki))

    _upstream(root_file, VaultAuth(token=STATIC_TOKEN)).sign_signing_ca(
        csr, trust_domain=TRUST_DOMAIN, ttl=HOUR
    )

    assert [call.url for call in requests_mock.request_history] == [SIGN_URL]
    assert requests_mock.request_history[-1].headers["X-Vault-Token"] == STATIC_TOKEN


def test_common_name_falls_back_when_the_csr_has_none(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    root_file: Path,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> None:
    _vault(requests_mock, pki)

    _upstream(root_file).sign_signing_ca(
        _csr(issuer_key, None), trust_domain=TRUST_DOMAIN, ttl=HOUR
    )

    assert requests_mock.request_history[-1].json()["common_name"] == "ztbank issuer CA"


@pytest.mark.parametrize(
    "signing",
    [
        pytest.param(Signing(key_usage=None), id="no-key-usage"),
        pytest.param(Signing(lifetime=HOUR - timedelta(seconds=30)), id="30s-short"),
    ],
)
def test_tolerated_differences_are_accepted(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    signing: Signing,
) -> None:
    _vault(requests_mock, pki, signing)

    signed = _upstream(root_file).sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert signed.roots == (pki.root.certificate,)


def test_each_signing_logs_in_afresh(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    upstream = _upstream(root_file)
    _vault(requests_mock, pki)

    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)
    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert len(_calls(requests_mock, LOGIN_URL)) == 2
    tokens = [call.headers["X-Vault-Token"] for call in _calls(requests_mock, SIGN_URL)]
    assert tokens == list(LOGIN_TOKENS)


def test_each_signing_uses_a_fresh_http_session(
    requests_mock: rm.Mocker,
    monkeypatch: pytest.MonkeyPatch,
    pki: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    opened: list[requests.Session] = []
    closed: list[requests.Session] = []
    real_init, real_close = requests.Session.__init__, requests.Session.close

    def init(self: requests.Session) -> None:
        real_init(self)
        opened.append(self)

    def close(self: requests.Session) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(requests.Session, "__init__", init)
    monkeypatch.setattr(requests.Session, "close", close)
    upstream = _upstream(root_file, VaultAuth(token=STATIC_TOKEN))
    requests_mock.post(SIGN_URL, json=signer_callback(pki))

    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)
    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert len(opened) == 2
    assert opened[0] is not opened[1]
    assert set(map(id, closed)) >= set(map(id, opened))


def test_ambient_vault_token_is_ignored(
    requests_mock: rm.Mocker,
    monkeypatch: pytest.MonkeyPatch,
    pki: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", STATIC_TOKEN)
    _vault(requests_mock, pki)

    _upstream(root_file).sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert "X-Vault-Token" not in requests_mock.request_history[0].headers
    assert json.loads(requests_mock.request_history[0].body)["role_id"] == ROLE_ID


# -- the pinned root -------------------------------------------------------------------------


def test_a_self_signed_root_in_ca_chain_is_never_trusted_on_its_own(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    # A complete, valid chain to a root - just not the pinned one.
    _vault(
        requests_mock,
        pki,
        Signing(
            signer=evil.intermediate,
            ca_chain=[evil.intermediate.certificate, evil.root.certificate],
        ),
    )

    message = _refusal(_upstream(root_file), csr)

    assert message == (
        f"{SIGNED} does not chain to the pinned root in {root_file}"
        f" (its chain ends at CN=evil root, SHA-256 fingerprint"
        f" {fingerprint_sha256(evil.root.certificate)})"
    )
    assert not _calls(requests_mock, ROOT_URL)


def test_the_root_mount_is_read_only_to_name_where_the_chain_ends(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    _vault(
        requests_mock,
        pki,
        Signing(signer=evil.intermediate, ca_chain=[evil.intermediate.certificate]),
    )
    requests_mock.get(ROOT_URL, text=pem(evil.root.certificate))

    message = _refusal(_upstream(root_file), csr)

    assert message.startswith(f"{SIGNED} does not chain to the pinned root in {root_file}")
    assert message.endswith(
        f"(its chain ends at CN=evil root, SHA-256 fingerprint"
        f" {fingerprint_sha256(evil.root.certificate)})"
    )
    assert len(_calls(requests_mock, ROOT_URL)) == 1


@pytest.mark.parametrize(
    "root_mount",
    [
        pytest.param({"status_code": 204}, id="empty"),
        pytest.param({"status_code": 403, "json": {"errors": ["permission denied"]}}, id="denied"),
        pytest.param({"text": "garbage"}, id="garbage"),
    ],
)
def test_the_chain_end_is_named_when_vault_does_not_return_its_root(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    root_mount: dict[str, Any],
) -> None:
    _vault(
        requests_mock,
        pki,
        Signing(signer=evil.intermediate, ca_chain=[evil.intermediate.certificate]),
    )
    requests_mock.get(ROOT_URL, **root_mount)

    message = _refusal(_upstream(root_file), csr)

    assert message == (
        f"{SIGNED} does not chain to the pinned root in {root_file}"
        " (its chain ends at CN=evil root, which Vault did not return)"
    )


def test_a_root_with_the_pinned_name_but_another_key_is_refused(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    lookalike = create_root_ca(common_name="test root", uri_sans=[]).certificate
    pinned = tmp_path / "lookalike.pem"
    pinned.write_text(pem(lookalike))
    _vault(requests_mock, pki)

    message = _refusal(_upstream(pinned), csr)

    assert (
        f"does not chain to the pinned root in {pinned} (its chain ends at CN=test root," in message
    )


def test_the_pinned_root_file_is_read_at_every_signing(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    pinned = evil.write_root(tmp_path / "root.pem")
    upstream = _upstream(pinned)
    _vault(requests_mock, pki)
    assert "does not chain to the pinned root" in _refusal(upstream, csr)

    pki.write_root(pinned)  # the operator re-pins; no restart
    signed = upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert signed.roots == (pki.root.certificate,)


def test_a_missing_pinned_root_file_is_refused_before_calling_vault(
    requests_mock: rm.Mocker, tmp_path: Path, csr: x509.CertificateSigningRequest
) -> None:
    missing = tmp_path / "nowhere.pem"

    message = _refusal(_upstream(missing), csr)

    assert message == (
        f"cannot read the pinned Vault root CA file {missing}: No such file or directory"
    )
    assert not requests_mock.request_history


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        pytest.param("", "holds no PEM certificate", id="empty"),
        pytest.param("not a certificate", "holds no PEM certificate", id="garbage"),
        pytest.param(
            "intermediate",
            "holds CN=test pki_int, which is not a self-signed CA",
            id="intermediate",
        ),
    ],
)
def test_a_bad_pinned_root_file_is_refused_before_calling_vault(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    content: str,
    rule: str,
) -> None:
    pinned = tmp_path / "root.pem"
    pinned.write_text(pem(pki.intermediate.certificate) if content == "intermediate" else content)

    message = _refusal(_upstream(pinned), csr)

    assert message == f"the pinned Vault root CA file {pinned} {rule}"
    assert not requests_mock.request_history


# -- the signed CA -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signing", "rule"),
    [
        pytest.param(
            Signing(public_key=ec.generate_private_key(ec.SECP256R1()).public_key()),
            f"{WHERE} returned a certificate for a different key than the CSR's",
            id="other-key",
        ),
        pytest.param(
            Signing(ca=False), f"{WHERE} returned a certificate that is not a CA", id="not-a-ca"
        ),
        pytest.param(
            Signing(path_length=None),
            f"{SIGNED} allows further CAs below the issuer (no path length limit);"
            " its path length must be 0",
            id="no-path-length",
        ),
        pytest.param(
            Signing(path_length=1),
            f"{SIGNED} allows further CAs below the issuer (path length 1);"
            " its path length must be 0",
            id="path-length-1",
        ),
        pytest.param(
            Signing(key_usage=KeyUsageSpec(digital_signature=True, crl_sign=True)),
            f"{SIGNED} may not sign certificates (its KeyUsage lacks keyCertSign)",
            id="no-cert-sign",
        ),
        pytest.param(
            Signing(uri_sans=[]),
            f"{SIGNED} must carry exactly one URI SAN, spiffe://{TRUST_DOMAIN} (it carries: none)",
            id="no-uri-san",
        ),
        pytest.param(
            Signing(uri_sans=["spiffe://other.test"]),
            f"{SIGNED} must carry exactly one URI SAN, spiffe://{TRUST_DOMAIN}"
            " (it carries: spiffe://other.test)",
            id="other-trust-domain",
        ),
        pytest.param(
            Signing(uri_sans=[f"spiffe://{TRUST_DOMAIN}", f"spiffe://{TRUST_DOMAIN}/extra"]),
            f"{SIGNED} must carry exactly one URI SAN, spiffe://{TRUST_DOMAIN}"
            f" (it carries: spiffe://{TRUST_DOMAIN}, spiffe://{TRUST_DOMAIN}/extra)",
            id="two-uri-sans",
        ),
    ],
)
def test_a_signed_ca_breaking_a_rule_is_refused_naming_it(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    signing: Signing,
    rule: str,
) -> None:
    _vault(requests_mock, pki, signing)

    assert _refusal(_upstream(root_file), csr) == rule


def test_a_shorter_lifetime_than_asked_is_refused(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    _vault(requests_mock, pki, Signing(lifetime=timedelta(minutes=58)))

    message = _refusal(_upstream(root_file), csr)

    assert re.fullmatch(
        rf"{re.escape(SIGNED)} expires at \S+Z, shorter than asked \(1h from \S+Z; Vault caps a"
        r" TTL at the mount's max TTL and at its issuer's expiry\)",
        message,
    ), message


def test_a_lifetime_beyond_the_parents_is_refused(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    _vault(requests_mock, pki, Signing(lifetime=timedelta(days=31)))

    message = _refusal(_upstream(root_file), csr)

    parent = _time(pki.intermediate.certificate.not_valid_after_utc)
    assert re.fullmatch(
        rf"{re.escape(SIGNED)} expires at \S+Z, beyond its parent's"
        rf" \(CN=test pki_int expires at {parent}\)",
        message,
    ), message


def test_a_ca_not_valid_yet_is_refused(
    requests_mock: rm.Mocker, pki: VaultPki, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    start = (datetime.now(UTC) + timedelta(minutes=5)).replace(microsecond=0)
    _vault(requests_mock, pki, Signing(not_before=start, lifetime=2 * HOUR))

    assert _refusal(_upstream(root_file), csr) == f"{SIGNED} is not valid until {_time(start)}"


def test_a_ca_not_signed_by_the_issuer_vault_names_is_refused(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    evil: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    # Claims pki_int as its issuer, but another key signed it.
    _vault(
        requests_mock,
        pki,
        Signing(signer=evil.intermediate, issuer_name=pki.intermediate.certificate.subject),
    )

    assert _refusal(_upstream(root_file), csr) == (
        f"{SIGNED}: CN=ztbank issuer CA does not verify as issued by CN=test pki_int,"
        " the certificate Vault returned as its issuer"
    )


# -- the CAs above it ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        pytest.param({"intermediate_is_ca": False}, "which is not a CA", id="not-a-ca"),
        pytest.param(
            {"intermediate_path_length": 0},
            "which has path length 0, too short for the 1 CA(s) below it",
            id="path-length-0",
        ),
        pytest.param(
            {"intermediate_key_usage": KeyUsageSpec(digital_signature=True)},
            "which may not sign certificates (its KeyUsage lacks keyCertSign)",
            id="no-cert-sign",
        ),
    ],
)
def test_an_intermediate_breaking_a_rule_is_refused_naming_it(
    requests_mock: rm.Mocker,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    kwargs: dict[str, Any],
    rule: str,
) -> None:
    bad = VaultPki.create(**kwargs)
    _vault(requests_mock, bad)

    message = _refusal(_upstream(bad.write_root(tmp_path / "root.pem")), csr)

    assert message == f"{SIGNED} chains through CN=test pki_int, {rule}"


def test_an_expired_intermediate_is_refused(
    requests_mock: rm.Mocker, tmp_path: Path, csr: x509.CertificateSigningRequest
) -> None:
    expired_at = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
    bad = VaultPki.create(intermediate_not_after=expired_at)
    # Vault would refuse to sign with it; an answer that it did is not believed either.
    _vault(requests_mock, bad, Signing(lifetime=HOUR))

    message = _refusal(_upstream(bad.write_root(tmp_path / "root.pem")), csr)

    assert (
        message == f"{SIGNED} chains through CN=test pki_int, which expired at {_time(expired_at)}"
    )


def test_an_expired_pinned_root_is_refused(
    requests_mock: rm.Mocker, tmp_path: Path, csr: x509.CertificateSigningRequest
) -> None:
    expired_at = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
    bad = VaultPki.create(root_not_after=expired_at)
    pinned = bad.write_root(tmp_path / "root.pem")
    _vault(requests_mock, bad)

    assert _refusal(_upstream(pinned), csr) == (
        f"the pinned root CN=test root in {pinned} expired at {_time(expired_at)}"
    )


# -- AppRole from a file ---------------------------------------------------------------------


def test_the_approle_file_is_read_at_every_login(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    approle = _write_approle(tmp_path / "approle.json")
    upstream = _upstream(root_file, VaultAuth(approle_file=approle))
    requests_mock.post(LOGIN_URL, _login_responses(*LOGIN_TOKENS, LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=signer_callback(pki))
    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    approle.write_text("{broken")  # a trainer breaks it at run time...
    message = _refusal(upstream, csr)
    _write_approle(approle, "role-id-0002", "secret-id-0002")  # ...and restores it, rotated
    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert message == f"the Vault AppRole file {approle} is not JSON (line 1, column 2)"
    logins = [call.json() for call in _calls(requests_mock, LOGIN_URL)]
    assert logins == [
        {"role_id": ROLE_ID, "secret_id": SECRET_ID},
        {"role_id": "role-id-0002", "secret_id": "secret-id-0002"},
    ]


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        pytest.param(None, ": No such file or directory", id="missing"),
        pytest.param(b"", " is not JSON (line 1, column 1)", id="empty"),
        pytest.param(SECRET_ID.encode(), " is not JSON (line 1, column 1)", id="bare-secret"),
        pytest.param(b"\xff" + SECRET_ID.encode(), " is not UTF-8 JSON", id="not-utf8"),
        pytest.param(
            json.dumps([ROLE_ID, SECRET_ID]).encode(), " does not hold a JSON object", id="list"
        ),
        pytest.param(
            json.dumps({"role_id": ROLE_ID}).encode(), " has no 'secret_id' string", id="no-secret"
        ),
        pytest.param(
            json.dumps({"role_id": " ", "secret_id": SECRET_ID}).encode(),
            " has no 'role_id' string",
            id="blank-role",
        ),
        pytest.param(
            json.dumps({"role_id": ROLE_ID, "secret_id": 42}).encode(),
            " has no 'secret_id' string",
            id="number",
        ),
        pytest.param(
            # Vault's init.json given by mistake: its unseal key and root token stay unsaid.
            json.dumps({"unseal_keys_b64": [UNSEAL_KEY], "root_token": STATIC_TOKEN}).encode(),
            " has no 'role_id' string",
            id="init-json",
        ),
    ],
)
def test_a_bad_approle_file_is_one_line_naming_it_and_none_of_its_content(
    requests_mock: rm.Mocker,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    content: bytes | None,
    rule: str,
) -> None:
    approle = tmp_path / "approle.json"
    if content is not None:
        approle.write_bytes(content)

    message = _refusal(_upstream(root_file, VaultAuth(approle_file=approle)), csr)

    prefix = "cannot read " if content is None else ""
    assert message == f"{prefix}the Vault AppRole file {approle}{rule}"
    assert not requests_mock.request_history


def test_an_approle_file_that_is_a_directory_is_refused(
    requests_mock: rm.Mocker, root_file: Path, tmp_path: Path, csr: x509.CertificateSigningRequest
) -> None:
    message = _refusal(_upstream(root_file, VaultAuth(approle_file=tmp_path)), csr)

    assert message == f"cannot read the Vault AppRole file {tmp_path}: Is a directory"


# -- failures: one line naming the cause, no secret --------------------------------------------


@pytest.mark.parametrize("source", ["inline", "file"])
def test_a_refused_approle_login_says_so(
    requests_mock: rm.Mocker,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    source: str,
) -> None:
    approle = _write_approle(tmp_path / "approle.json")
    auth = VaultAuth(approle_file=approle) if source == "file" else _approle()
    requests_mock.post(LOGIN_URL, status_code=400, json={"errors": ["invalid role or secret ID"]})

    message = _refusal(_upstream(root_file, auth), csr)

    in_file = f" in {approle}" if source == "file" else ""
    assert message == (
        f"Vault refused the AppRole login at auth/approle/login at {ADDR}"
        f" (wrong role_id or secret_id{in_file}?): invalid role or secret ID"
    )
    assert not _calls(requests_mock, SIGN_URL)


def test_a_refused_login_echoing_the_secret_is_redacted(
    requests_mock: rm.Mocker, root_file: Path, tmp_path: Path, csr: x509.CertificateSigningRequest
) -> None:
    approle = _write_approle(tmp_path / "approle.json")
    requests_mock.post(
        LOGIN_URL, status_code=403, json={"errors": [f"secret_id {SECRET_ID} is not valid"]}
    )

    message = _refusal(_upstream(root_file, VaultAuth(approle_file=approle)), csr)

    assert message.endswith(
        f"(wrong role_id or secret_id in {approle}?): secret_id <redacted> is not valid"
    )


@pytest.mark.parametrize("url", [LOGIN_URL, SIGN_URL])
def test_a_sealed_vault_says_so(
    requests_mock: rm.Mocker,
    pki: VaultPki,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    url: str,
) -> None:
    _vault(requests_mock, pki)
    requests_mock.post(url, status_code=503, json={"errors": ["Vault is sealed"]})

    message = _refusal(_upstream(root_file), csr)

    path = url.removeprefix(f"{ADDR}/v1/")
    assert message == f"Vault at {ADDR} is sealed ({path} answered 503): unseal it"


@pytest.mark.parametrize(
    ("response", "cause"),
    [
        pytest.param(
            {"status_code": 503, "json": {"errors": ["Vault is in standby"]}},
            f"Vault at {ADDR} is unavailable (pki_int/root/sign-intermediate answered 503:"
            " Vault is in standby)",
            id="503",
        ),
        pytest.param(
            {"status_code": 501, "json": {"errors": ["Vault is not initialized"]}},
            f"Vault at {ADDR} is not initialised (pki_int/root/sign-intermediate answered 501)",
            id="501",
        ),
        pytest.param(
            {"exc": requests.exceptions.ConnectTimeout("timed out")},
            f"Vault at {ADDR} is unreachable (pki_int/root/sign-intermediate):"
            " no connection within 10s",
            id="connect-timeout",
        ),
        pytest.param(
            {"exc": requests.exceptions.ReadTimeout("read timed out")},
            f"Vault at {ADDR} did not answer pki_int/root/sign-intermediate within 10s",
            id="read-timeout",
        ),
        pytest.param(
            {"exc": requests.exceptions.ConnectionError("connection reset")},
            f"Vault at {ADDR} is unreachable (pki_int/root/sign-intermediate): connection reset",
            id="connection",
        ),
        pytest.param(
            {"status_code": 403, "json": {"errors": ["permission denied"]}},
            "Vault denied the token access to pki_int/root/sign-intermediate at"
            f" {ADDR}: check the issuer's policy",
            id="denied",
        ),
    ],
)
def test_sign_failures_name_their_cause(
    requests_mock: rm.Mocker,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    response: dict[str, Any],
    cause: str,
) -> None:
    requests_mock.post(SIGN_URL, **response)

    assert _refusal(_upstream(root_file, VaultAuth(token=STATIC_TOKEN)), csr) == cause


def test_forbidden_after_login_is_not_retried(
    requests_mock: rm.Mocker, root_file: Path, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(*LOGIN_TOKENS))
    requests_mock.post(SIGN_URL, status_code=403, json={"errors": ["permission denied"]})

    message = _refusal(_upstream(root_file), csr)

    assert message == (
        "Vault denied the AppRole token (mount 'approle') access to"
        f" pki_int/root/sign-intermediate at {ADDR}: check the issuer's policy"
    )
    assert len(_calls(requests_mock, LOGIN_URL)) == 1
    assert len(_calls(requests_mock, SIGN_URL)) == 1


# What Vault answers; ECHO stands for every secret the signing has used, as a hostile or buggy
# server (or proxy) might echo them.
ECHO = "<echo>"


@pytest.mark.parametrize(
    "response",
    [
        pytest.param({"status_code": 500, "json": {"errors": ["internal error"]}}, id="500"),
        pytest.param(
            {"status_code": 500, "json": {"errors": [f"echoes {ECHO}"]}}, id="500-echoing-secrets"
        ),
        pytest.param(
            {"status_code": 400, "json": {"errors": [("x" * 290) + ECHO]}},
            id="secret-across-the-cut",
        ),
        pytest.param(
            {"status_code": 503, "json": {"errors": [f"standby {ECHO}"]}}, id="503-echoing"
        ),
        pytest.param({"status_code": 502, "text": "<html>\nbad\ngateway\n</html>"}, id="502-html"),
        pytest.param(
            {"exc": requests.exceptions.ConnectionError(f"refused {ECHO}")},
            id="connection-echoing-secrets",
        ),
        pytest.param({"exc": requests.exceptions.ReadTimeout("read timed out")}, id="timeout"),
        pytest.param({"text": f"this is not json {ECHO}"}, id="garbage-200"),
        pytest.param({"json": {"data": {"certificate": "garbage"}}}, id="garbage-certificate"),
        pytest.param({"json": {"data": {}}}, id="no-certificate"),
        pytest.param({"json": ["not", "an", "object"]}, id="json-list"),
    ],
)
@pytest.mark.parametrize("auth", ["token", "approle-file"])
def test_sign_failures_are_one_line_upstream_errors_without_secrets(
    requests_mock: rm.Mocker,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    caplog: pytest.LogCaptureFixture,
    response: dict[str, Any],
    auth: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    if auth == "token":
        credentials, used = VaultAuth(token=STATIC_TOKEN), [STATIC_TOKEN]
    else:
        approle = _write_approle(tmp_path / "approle.json")
        credentials, used = VaultAuth(approle_file=approle), [SECRET_ID, LOGIN_TOKENS[0]]
    echo = " ".join(used)
    answer = json.loads(json.dumps(response, default=repr).replace(ECHO, echo))
    if "exc" in response:
        answer["exc"] = type(response["exc"])(str(response["exc"]).replace(ECHO, echo))
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, **answer)
    upstream = _upstream(root_file, credentials)

    message = _refusal(upstream, csr)

    assert "pki_int/root/sign-intermediate" in message
    assert ADDR in message
    assert not [secret for secret in SECRETS if secret in caplog.text]
    assert not [secret for secret in SECRETS if secret in repr(upstream)]


@pytest.mark.parametrize(
    "response",
    [
        pytest.param({"status_code": 500, "json": {"errors": ["internal error"]}}, id="500"),
        pytest.param({"text": "garbage"}, id="garbage"),
        pytest.param({"json": {"auth": None}}, id="no-auth"),
        pytest.param({"exc": requests.exceptions.ConnectionError("connection refused")}, id="down"),
    ],
)
def test_login_failures_are_upstream_errors_without_secrets(
    requests_mock: rm.Mocker,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    response: dict[str, Any],
) -> None:
    requests_mock.post(LOGIN_URL, **response)

    assert "auth/approle/login" in _refusal(_upstream(root_file), csr)
    assert not _calls(requests_mock, SIGN_URL)


# -- real sockets: TLS and refused connections ---------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.create(tmp_path_factory.mktemp("tls"))


def test_an_untrusted_tls_certificate_says_so_and_a_fixed_ca_file_is_read_next_time(
    pki: VaultPki,
    root_file: Path,
    tls: TlsFiles,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    ca_file = tmp_path / "vault-ca.pem"
    ca_file.write_text(pem(create_root_ca(common_name="some other CA", uri_sans=[]).certificate))
    with serve_fake_vault(pki, tls) as vault:
        upstream = _upstream(root_file, address=vault.address, ca_cert=str(ca_file))

        message = _refusal(upstream, csr)
        ca_file.write_text(tls.ca_file.read_text())  # the operator fixes VAULT_CACERT
        signed = upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert message == (
        f"Vault's TLS certificate at {vault.address} is not trusted by {ca_file}:"
        " unable to get local issuer certificate"
    )
    assert signed.roots == (pki.root.certificate,)
    assert [path for path, _, _ in vault.requests] == [
        "/v1/auth/approle/login",
        "/v1/pki_int/root/sign-intermediate",
    ]


def test_an_untrusted_tls_certificate_without_a_ca_file_names_the_system_store(
    pki: VaultPki,
    root_file: Path,
    tls: TlsFiles,
    csr: x509.CertificateSigningRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with serve_fake_vault(pki, tls) as vault:
        message = _refusal(_upstream(root_file, address=vault.address), csr)

    assert message.startswith(
        f"Vault's TLS certificate at {vault.address} is not trusted by the system's CA"
        " certificates (no VAULT_CACERT): "
    )


@pytest.mark.parametrize("content", [None, "not a certificate"])
def test_an_unusable_vault_ca_file_is_refused_before_calling_vault(
    requests_mock: rm.Mocker,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
    content: str | None,
) -> None:
    ca_file = tmp_path / "vault-ca.pem"
    if content is not None:
        ca_file.write_text(content)

    message = _refusal(_upstream(root_file, ca_cert=str(ca_file)), csr)

    assert message == (
        f"cannot read Vault's CA certificate file {ca_file}: No such file or directory"
        if content is None
        else f"Vault's CA certificate file {ca_file} holds no PEM certificate"
    )
    assert not requests_mock.request_history


def test_a_refused_connection_says_so(root_file: Path, csr: x509.CertificateSigningRequest) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"http://127.0.0.1:{port}"

    message = _refusal(_upstream(root_file, address=address, timeout=2), csr)

    assert message == f"Vault at {address} is unreachable (auth/approle/login): connection refused"


# -- construction and settings -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("trust_domain", "ttl"),
    [("Bank.Test", HOUR), ("", HOUR), (TRUST_DOMAIN, timedelta(0))],
)
def test_bad_arguments_are_refused_before_calling_vault(
    requests_mock: rm.Mocker,
    root_file: Path,
    csr: x509.CertificateSigningRequest,
    trust_domain: str,
    ttl: timedelta,
) -> None:
    with pytest.raises(UpstreamError):
        _upstream(root_file).sign_signing_ca(csr, trust_domain=trust_domain, ttl=ttl)

    assert not requests_mock.request_history


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"token": STATIC_TOKEN, "role_id": ROLE_ID, "secret_id": SECRET_ID},
        {"token": STATIC_TOKEN, "approle_file": Path("approle.json")},
        {"role_id": ROLE_ID, "secret_id": SECRET_ID, "approle_file": Path("approle.json")},
        {"token": ""},
        {"role_id": ROLE_ID},
        {"secret_id": SECRET_ID},
        {"role_id": "", "secret_id": SECRET_ID},
        {"role_id": ROLE_ID, "secret_id": SECRET_ID, "approle_mount": "/"},
        {"approle_file": Path("approle.json"), "approle_mount": ""},
    ],
)
def test_vault_auth_needs_exactly_one_complete_mode(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError) as caught:
        VaultAuth(**kwargs)

    assert SECRET_ID not in str(caught.value)
    assert STATIC_TOKEN not in str(caught.value)


def test_vault_auth_repr_hides_secrets() -> None:
    text = repr(VaultAuth(role_id=ROLE_ID, secret_id=SECRET_ID)) + repr(
        VaultAuth(token=STATIC_TOKEN)
    )

    assert SECRET_ID not in text
    assert STATIC_TOKEN not in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address": "vault.test:8200"},
        {"address": "ftp://vault.test"},
        {"address": ADDR, "pki_mount": "/"},
        {"address": ADDR, "timeout": 0},
    ],
)
def test_bad_construction_is_refused(kwargs: dict[str, Any], root_file: Path) -> None:
    with pytest.raises(UpstreamError):
        VaultUpstream(auth=_approle(), pinned_roots_file=root_file, **kwargs)


def test_build_upstream_wires_the_settings(
    requests_mock: rm.Mocker,
    monkeypatch: pytest.MonkeyPatch,
    pki: VaultPki,
    root_file: Path,
    tmp_path: Path,
    csr: x509.CertificateSigningRequest,
) -> None:
    approle = _write_approle(tmp_path / "approle.json")
    for name, value in {
        "ZTBANK_UPSTREAM": "vault",
        "VAULT_ADDR": ADDR,
        "VAULT_TOKEN": STATIC_TOKEN,  # ambient: the AppRole wins
        "ZTBANK_VAULT_APPROLE_FILE": str(approle),
        "ZTBANK_VAULT_ROOT_CA": str(root_file),
        "ZTBANK_VAULT_PKI_MOUNT": "ztbank_int",
    }.items():
        monkeypatch.setenv(name, value)
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(f"{ADDR}/v1/ztbank_int/root/sign-intermediate", json=signer_callback(pki))

    upstream = build_upstream(load_settings(IssuerSettings))
    signed = upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=HOUR)

    assert upstream.name == "vault"
    assert signed.roots == (pki.root.certificate,)
    assert requests_mock.request_history[0].json() == {"role_id": ROLE_ID, "secret_id": SECRET_ID}
