"""VaultUpstream against a Vault mocked at the HTTP boundary, one that really signs the CSR."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import requests_mock as rm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.issuer.adapters.upstream_vault import VaultAuth, VaultUpstream
from services.issuer.errors import UpstreamError

ADDR = "https://vault.test:8200"
TRUST_DOMAIN = "bank.test"
ROLE_ID = "role-id-0001"
SECRET_ID = "secret-id-do-not-leak"
LOGIN_TOKENS = ("hvs.first-login-token", "hvs.second-login-token")
STATIC_TOKEN = "hvs.static-token-do-not-leak"
SIGN_URL = f"{ADDR}/v1/pki_int/root/sign-intermediate"
LOGIN_URL = f"{ADDR}/v1/auth/approle/login"
ROOT_URL = f"{ADDR}/v1/pki/ca/pem"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    path_length: int | None,
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .sign(signing_key, hashes.SHA256())
    )


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Pki:
    """What the mocked Vault holds: a root in ``pki`` and an intermediate in ``pki_int``."""

    root: x509.Certificate
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _ca_cert("test root", root_key, None, None)
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _ca_cert("test pki_int", intermediate_key, (root, root_key), 1)
    return Pki(root, intermediate, intermediate_key)


@pytest.fixture
def issuer_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(
    key: ec.EllipticCurvePrivateKey, common_name: str | None
) -> x509.CertificateSigningRequest:
    subject = _name(common_name) if common_name else x509.Name([])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


@pytest.fixture
def csr(issuer_key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return _csr(issuer_key, "ztbank issuer CA")


def _signer(
    pki: Pki,
    *,
    include_root: bool = True,
    public_key: ec.EllipticCurvePublicKey | None = None,
    ca: bool = True,
) -> Any:
    """A requests_mock callback doing what Vault's root/sign-intermediate does with the body."""

    def sign(request: Any, context: Any) -> dict[str, Any]:
        body = request.json()
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(body["common_name"]))
            .issuer_name(pki.intermediate.subject)
            .public_key(public_key or csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(seconds=int(body["ttl"].removesuffix("s"))))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=body["max_path_length"] if ca else None),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(body["uri_sans"])]),
                critical=False,
            )
            .sign(pki.intermediate_key, hashes.SHA256())
        )
        chain = [_pem(certificate), _pem(pki.intermediate)]
        if include_root:
            chain.append(_pem(pki.root))
        return {
            "data": {
                "certificate": _pem(certificate),
                "issuing_ca": _pem(pki.intermediate),
                "ca_chain": chain,
                "serial_number": format(certificate.serial_number, "x"),
            }
        }

    return sign


def _login_responses(*tokens: str) -> list[dict[str, Any]]:
    return [{"json": {"auth": {"client_token": token, "lease_duration": 3600}}} for token in tokens]


def _approle() -> VaultAuth:
    return VaultAuth(role_id=ROLE_ID, secret_id=SECRET_ID)


def _upstream(auth: VaultAuth | None = None, **kwargs: Any) -> VaultUpstream:
    return VaultUpstream(ADDR, auth=auth or _approle(), **kwargs)


def _calls(requests_mock: rm.Mocker, url: str) -> list[Any]:
    return [call for call in requests_mock.request_history if call.url == url]


def test_approle_login_then_sign_returns_ca_chain_and_root(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki))

    signed = _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

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
    assert signed.certificate.issuer == pki.intermediate.subject
    assert signed.chain == (pki.intermediate,)
    assert signed.roots == (pki.root,)
    assert not _calls(requests_mock, ROOT_URL)


def test_root_is_fetched_from_the_root_mount_when_ca_chain_lacks_it(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(
        f"{ADDR}/v1/ztbank_int/root/sign-intermediate", json=_signer(pki, include_root=False)
    )
    requests_mock.get(
        f"{ADDR}/v1/ztbank_root/ca/pem",
        text=_pem(pki.root),
        headers={"Content-Type": "application/pem-certificate-chain"},
    )

    signed = _upstream(pki_mount="ztbank_int", root_mount="ztbank_root").sign_signing_ca(
        csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(minutes=90)
    )

    assert signed.chain == (pki.intermediate,)
    assert signed.roots == (pki.root,)
    assert requests_mock.request_history[1].json()["ttl"] == "5400s"


def test_static_token_is_sent_without_login(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(SIGN_URL, json=_signer(pki))

    _upstream(VaultAuth(token=STATIC_TOKEN)).sign_signing_ca(
        csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1)
    )

    assert [call.url for call in requests_mock.request_history] == [SIGN_URL]
    assert requests_mock.request_history[-1].headers["X-Vault-Token"] == STATIC_TOKEN


def test_common_name_falls_back_when_the_csr_has_none(
    requests_mock: rm.Mocker, pki: Pki, issuer_key: ec.EllipticCurvePrivateKey
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki))

    _upstream().sign_signing_ca(
        _csr(issuer_key, None), trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1)
    )

    assert requests_mock.request_history[-1].json()["common_name"] == "ztbank issuer CA"


def test_expired_token_gets_one_fresh_login(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    upstream = _upstream()
    requests_mock.post(LOGIN_URL, _login_responses(*LOGIN_TOKENS))
    requests_mock.post(
        SIGN_URL,
        [
            {"json": _signer(pki)},
            {"status_code": 403, "json": {"errors": ["permission denied"]}},
            {"json": _signer(pki)},
        ],
    )

    upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))
    signed = upstream.sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

    assert signed.roots == (pki.root,)
    assert len(_calls(requests_mock, LOGIN_URL)) == 2
    tokens = [call.headers["X-Vault-Token"] for call in _calls(requests_mock, SIGN_URL)]
    assert tokens == [LOGIN_TOKENS[0], LOGIN_TOKENS[0], LOGIN_TOKENS[1]]


def test_forbidden_after_a_fresh_login_is_not_retried(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(*LOGIN_TOKENS))
    requests_mock.post(SIGN_URL, status_code=403, json={"errors": ["permission denied"]})

    with pytest.raises(UpstreamError, match="denied") as caught:
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

    assert len(_calls(requests_mock, LOGIN_URL)) == 1
    assert len(_calls(requests_mock, SIGN_URL)) == 1
    assert "pki_int/root/sign-intermediate" in str(caught.value)


def test_forbidden_static_token_is_an_error(
    requests_mock: rm.Mocker, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(SIGN_URL, status_code=403, json={"errors": ["permission denied"]})

    with pytest.raises(UpstreamError, match="denied") as caught:
        _upstream(VaultAuth(token=STATIC_TOKEN)).sign_signing_ca(
            csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1)
        )

    assert STATIC_TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    "response",
    [
        pytest.param({"status_code": 500, "json": {"errors": ["internal error"]}}, id="500"),
        pytest.param(
            {"status_code": 500, "json": {"errors": [f"echoes {SECRET_ID} and {LOGIN_TOKENS[0]}"]}},
            id="500-echoing-secrets",
        ),
        pytest.param({"status_code": 502, "text": "<html>bad gateway</html>"}, id="502-html"),
        pytest.param(
            {"exc": requests.exceptions.ConnectionError("connection refused")}, id="connection"
        ),
        pytest.param({"exc": requests.exceptions.ReadTimeout("read timed out")}, id="timeout"),
        pytest.param({"text": "this is not json"}, id="garbage-200"),
        pytest.param({"json": {"data": {"certificate": "garbage"}}}, id="garbage-certificate"),
        pytest.param({"json": {"data": {}}}, id="no-certificate"),
        pytest.param({"json": ["not", "an", "object"]}, id="json-list"),
    ],
)
def test_sign_failures_are_upstream_errors_without_secrets(
    requests_mock: rm.Mocker, csr: x509.CertificateSigningRequest, response: dict[str, Any]
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, **response)

    with pytest.raises(UpstreamError) as caught:
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

    message = str(caught.value)
    assert SECRET_ID not in message
    assert LOGIN_TOKENS[0] not in message
    assert "pki_int/root/sign-intermediate" in message
    assert ADDR in message
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    "response",
    [
        pytest.param({"status_code": 400, "json": {"errors": ["invalid role or secret ID"]}}),
        pytest.param({"text": "garbage"}),
        pytest.param({"json": {"auth": None}}),
        pytest.param({"exc": requests.exceptions.ConnectionError("connection refused")}),
    ],
)
def test_login_failures_are_upstream_errors_without_secrets(
    requests_mock: rm.Mocker, csr: x509.CertificateSigningRequest, response: dict[str, Any]
) -> None:
    requests_mock.post(LOGIN_URL, **response)

    with pytest.raises(UpstreamError, match="auth/approle/login") as caught:
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

    assert SECRET_ID not in str(caught.value)
    assert not _calls(requests_mock, SIGN_URL)


def test_certificate_for_another_key_is_rejected(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki, public_key=other))

    with pytest.raises(UpstreamError, match="different key"):
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))


def test_non_ca_certificate_is_rejected(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki, ca=False))

    with pytest.raises(UpstreamError, match="not a CA"):
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))


def test_chain_that_does_not_reach_the_root_mounts_ca_is_rejected(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    unrelated_key = ec.generate_private_key(ec.SECP256R1())
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki, include_root=False))
    requests_mock.get(ROOT_URL, text=_pem(_ca_cert("unrelated root", unrelated_key, None, None)))

    with pytest.raises(UpstreamError, match="does not chain"):
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))


def test_empty_root_mount_is_an_error(
    requests_mock: rm.Mocker, pki: Pki, csr: x509.CertificateSigningRequest
) -> None:
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki, include_root=False))
    requests_mock.get(ROOT_URL, status_code=204)

    with pytest.raises(UpstreamError, match=r"pki/ca/pem at .* holds no CA"):
        _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))


@pytest.mark.parametrize(
    ("trust_domain", "ttl"),
    [("Bank.Test", timedelta(hours=1)), ("", timedelta(hours=1)), (TRUST_DOMAIN, timedelta(0))],
)
def test_bad_arguments_are_refused_before_calling_vault(
    requests_mock: rm.Mocker, csr: x509.CertificateSigningRequest, trust_domain: str, ttl: timedelta
) -> None:
    with pytest.raises(UpstreamError):
        _upstream().sign_signing_ca(csr, trust_domain=trust_domain, ttl=ttl)

    assert not requests_mock.request_history


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"token": STATIC_TOKEN, "role_id": ROLE_ID, "secret_id": SECRET_ID},
        {"token": ""},
        {"role_id": ROLE_ID},
        {"secret_id": SECRET_ID},
        {"role_id": "", "secret_id": SECRET_ID},
        {"role_id": ROLE_ID, "secret_id": SECRET_ID, "approle_mount": "/"},
    ],
)
def test_vault_auth_needs_exactly_one_complete_mode(kwargs: dict[str, str]) -> None:
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
def test_bad_construction_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError):
        VaultUpstream(auth=_approle(), **kwargs)


def test_ambient_vault_token_is_ignored(
    requests_mock: rm.Mocker,
    monkeypatch: pytest.MonkeyPatch,
    pki: Pki,
    csr: x509.CertificateSigningRequest,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", STATIC_TOKEN)
    requests_mock.post(LOGIN_URL, _login_responses(LOGIN_TOKENS[0]))
    requests_mock.post(SIGN_URL, json=_signer(pki))

    _upstream().sign_signing_ca(csr, trust_domain=TRUST_DOMAIN, ttl=timedelta(hours=1))

    assert "X-Vault-Token" not in requests_mock.request_history[0].headers
    assert json.loads(requests_mock.request_history[0].body)["role_id"] == ROLE_ID
