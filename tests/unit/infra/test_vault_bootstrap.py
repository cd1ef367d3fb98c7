"""infra/vault/bootstrap.py against a stateful fake Vault mocked at the HTTP boundary.

The fake keeps state across runs, so running the script twice shows what a second run against a
configured Vault actually sends, rather than what a static mock was told to expect.
"""

from __future__ import annotations

import json
import re
import secrets
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import requests_mock as rm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.vault_bootstrap import load_bootstrap_script

ADDR = "http://vault.test:8200"
PUBLIC_URL = "https://vault.bank.test"
TRUST_DOMAIN = "bank.test"


bootstrap = load_bootstrap_script()

Handler = Callable[..., requests.Response]


def _hours(value: object) -> int:
    text = str(value)
    return int(text.removesuffix("h")) * 3600 if text.endswith("h") else int(text)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _signed(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    body: dict[str, Any],
) -> x509.Certificate:
    now = datetime.now(UTC)
    max_path = body.get("max_path_length", -1)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(seconds=_hours(body["ttl"])))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if max_path < 0 else max_path),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(body["uri_sans"])]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


class FakeVault:
    """Just enough of Vault's HTTP API, with its state, for the bootstrap's calls."""

    def __init__(self) -> None:
        self.initialized = False
        self.sealed = True
        self.root_token = "hvs.fake-root-token"
        self.unseal_key = "dW5zZWFsLWtleQ=="
        self.mounts: dict[str, dict[str, Any]] = {"sys/": {"type": "system", "config": {}}}
        self.auth: dict[str, dict[str, Any]] = {"token/": {"type": "token"}}
        self.urls: dict[str, dict[str, Any]] = {}
        self.ca: dict[str, tuple[x509.Certificate, ec.EllipticCurvePrivateKey]] = {}
        self.pending_keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.pki_roles: dict[str, dict[str, Any]] = {}
        self.policies: dict[str, str] = {}
        self.approles: dict[str, dict[str, Any]] = {}
        self.role_ids: dict[str, str] = {}
        self.secret_ids: set[str] = set()
        self.calls: list[tuple[str, str, Any]] = []
        pki = r"(?P<mount>pki|pki_int)"
        self._routes: list[tuple[str, str, bool, Handler]] = [
            ("GET", "sys/init", False, self._init_status),
            ("PUT", "sys/init", False, self._initialize),
            ("GET", "sys/seal-status", False, self._seal_status),
            ("PUT", "sys/unseal", False, self._unseal),
            ("GET", "sys/health", False, self._health),
            ("GET", "sys/mounts", True, self._list_mounts),
            ("POST", r"sys/mounts/(?P<path>[^/]+)/tune", True, self._tune),
            ("POST", r"sys/mounts/(?P<path>[^/]+)", True, self._mount),
            ("GET", f"{pki}/ca/pem", False, self._ca_pem),
            ("GET", f"{pki}/config/urls", True, self._read_urls),
            ("POST", f"{pki}/config/urls", True, self._write_urls),
            ("POST", f"{pki}/root/generate/internal", True, self._generate_root),
            ("POST", f"{pki}/intermediate/generate/internal", True, self._generate_csr),
            ("POST", f"{pki}/root/sign-intermediate", True, self._sign_intermediate),
            ("POST", f"{pki}/intermediate/set-signed", True, self._set_signed),
            ("GET", f"{pki}/roles/(?P<name>[^/]+)", True, self._read_pki_role),
            ("POST", f"{pki}/roles/(?P<name>[^/]+)", True, self._write_pki_role),
            ("GET", r"sys/policy/(?P<name>[^/]+)", True, self._read_policy),
            ("PUT", r"sys/policy/(?P<name>[^/]+)", True, self._write_policy),
            ("GET", "sys/auth", True, self._list_auth),
            ("POST", r"sys/auth/(?P<path>[^/]+)", True, self._enable_auth),
            ("GET", r"auth/approle/role/(?P<name>[^/]+)/role-id", True, self._role_id),
            ("POST", r"auth/approle/role/(?P<name>[^/]+)/secret-id", True, self._new_secret),
            ("POST", r"auth/approle/role/(?P<name>[^/]+)/secret-id/lookup", True, self._lookup),
            ("GET", r"auth/approle/role/(?P<name>[^/]+)", True, self._read_approle),
            ("POST", r"auth/approle/role/(?P<name>[^/]+)", True, self._write_approle),
        ]

    def configured(self) -> FakeVault:
        """Initialised and unsealed, as a Vault someone else set up."""
        self.initialized = True
        self.sealed = False
        return self

    def mutations(self) -> list[tuple[str, str]]:
        """Writes, leaving out the secret-id lookup, which is a POST that only reads."""
        return [
            (method, path)
            for method, path, _ in self.calls
            if method in ("POST", "PUT", "DELETE") and not path.endswith("secret-id/lookup")
        ]

    def body(self, method: str, path: str) -> Any:
        return next(body for m, p, body in self.calls if (m, p) == (method, path))

    def __call__(self, request: Any) -> requests.Response | None:
        path = urlsplit(request.url).path.removeprefix("/v1/")
        body = json.loads(request.body) if request.body else None
        self.calls.append((request.method, path, body))
        for method, pattern, authenticated, handler in self._routes:
            match = re.fullmatch(pattern, path)
            if method != request.method or match is None:
                continue
            if authenticated and self.sealed:
                return self._errors(request, 503, "Vault is sealed")
            if authenticated and request.headers.get("X-Vault-Token") != self.root_token:
                return self._errors(request, 403, "permission denied")
            if "mount" in match.groupdict() and f"{match['mount']}/" not in self.mounts:
                return self._errors(request, 404, "no handler for route")
            return handler(request, body or {}, **match.groupdict())
        return self._errors(request, 404, f"fake Vault has no route {request.method} {path}")

    @staticmethod
    def _json(request: Any, payload: Any, status: int = 200) -> requests.Response:
        return rm.create_response(request, status_code=status, json=payload)

    @staticmethod
    def _empty(request: Any) -> requests.Response:
        return rm.create_response(request, status_code=204)

    def _errors(self, request: Any, status: int, message: str) -> requests.Response:
        return self._json(request, {"errors": [message]}, status)

    def _data(self, request: Any, data: dict[str, Any]) -> requests.Response:
        return self._json(request, {"data": data, **data})

    def _init_status(self, request: Any, body: Any) -> requests.Response:
        return self._json(request, {"initialized": self.initialized})

    def _initialize(self, request: Any, body: Any) -> requests.Response:
        if self.initialized:
            return self._errors(request, 400, "Vault is already initialized")
        assert (body["secret_shares"], body["secret_threshold"]) == (1, 1)
        self.initialized = True
        return self._json(
            request,
            {"keys": ["756e"], "keys_base64": [self.unseal_key], "root_token": self.root_token},
        )

    def _seal_status(self, request: Any, body: Any) -> requests.Response:
        return self._json(request, {"sealed": self.sealed, "initialized": self.initialized})

    def _unseal(self, request: Any, body: Any) -> requests.Response:
        if body.get("key") == self.unseal_key:
            self.sealed = False
        return self._json(request, {"sealed": self.sealed})

    def _health(self, request: Any, body: Any) -> requests.Response:
        status = 503 if self.sealed else 200
        return self._json(request, {"sealed": self.sealed, "standby": False}, status)

    def _list_mounts(self, request: Any, body: Any) -> requests.Response:
        return self._data(request, self.mounts)

    def _mount(self, request: Any, body: Any, path: str) -> requests.Response:
        if f"{path}/" in self.mounts:
            return self._errors(request, 400, "path is already in use")
        config = {"max_lease_ttl": _hours(body["config"]["max_lease_ttl"])}
        self.mounts[f"{path}/"] = {"type": body["type"], "config": config}
        return self._empty(request)

    def _tune(self, request: Any, body: Any, path: str) -> requests.Response:
        self.mounts[f"{path}/"]["config"]["max_lease_ttl"] = _hours(body["max_lease_ttl"])
        return self._empty(request)

    def _ca_pem(self, request: Any, body: Any, mount: str) -> requests.Response:
        if mount not in self.ca:
            return self._empty(request)
        return rm.create_response(
            request,
            text=_pem(self.ca[mount][0]),
            headers={"Content-Type": "application/pem-certificate-chain"},
        )

    def _read_urls(self, request: Any, body: Any, mount: str) -> requests.Response:
        empty: dict[str, list[str]] = {
            "issuing_certificates": [],
            "crl_distribution_points": [],
            "ocsp_servers": [],
        }
        return self._data(request, self.urls.get(mount, empty))

    def _write_urls(self, request: Any, body: Any, mount: str) -> requests.Response:
        self.urls[mount] = body
        return self._empty(request)

    def _generate_root(self, request: Any, body: Any, mount: str) -> requests.Response:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, body["common_name"])])
        certificate = _signed(name, key.public_key(), name, key, body)
        self.ca[mount] = (certificate, key)
        return self._data(request, {"certificate": _pem(certificate)})

    def _generate_csr(self, request: Any, body: Any, mount: str) -> requests.Response:
        key = ec.generate_private_key(ec.SECP256R1())
        self.pending_keys[mount] = key
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, body["common_name"])])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        return self._data(request, {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()})

    def _sign_intermediate(self, request: Any, body: Any, mount: str) -> requests.Response:
        issuer, issuer_key = self.ca[mount]
        csr = x509.load_pem_x509_csr(body["csr"].encode())
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, body["common_name"])])
        certificate = _signed(name, public_key, issuer.subject, issuer_key, body)
        chain = [_pem(certificate), _pem(issuer)]
        return self._data(
            request,
            {"certificate": _pem(certificate), "issuing_ca": _pem(issuer), "ca_chain": chain},
        )

    def _set_signed(self, request: Any, body: Any, mount: str) -> requests.Response:
        certificate = x509.load_pem_x509_certificate(body["certificate"].encode())
        key = self.pending_keys.pop(mount)
        assert certificate.public_key() == key.public_key()
        self.ca[mount] = (certificate, key)
        return self._data(request, {"imported_issuers": ["int-issuer-id"]})

    def _read_pki_role(self, request: Any, body: Any, mount: str, name: str) -> requests.Response:
        role = self.pki_roles.get(f"{mount}/{name}")
        return self._data(request, role) if role else self._errors(request, 404, "")

    def _write_pki_role(self, request: Any, body: Any, mount: str, name: str) -> requests.Response:
        self.pki_roles[f"{mount}/{name}"] = body
        return self._data(request, body)

    def _read_policy(self, request: Any, body: Any, name: str) -> requests.Response:
        if name not in self.policies:
            return self._errors(request, 404, "")
        return self._data(request, {"name": name, "rules": self.policies[name]})

    def _write_policy(self, request: Any, body: Any, name: str) -> requests.Response:
        self.policies[name] = body["policy"]
        return self._empty(request)

    def _list_auth(self, request: Any, body: Any) -> requests.Response:
        return self._data(request, self.auth)

    def _enable_auth(self, request: Any, body: Any, path: str) -> requests.Response:
        self.auth[f"{path}/"] = {"type": body["type"]}
        return self._empty(request)

    def _read_approle(self, request: Any, body: Any, name: str) -> requests.Response:
        role = self.approles.get(name)
        return self._data(request, role) if role else self._errors(request, 404, "")

    def _write_approle(self, request: Any, body: Any, name: str) -> requests.Response:
        role = dict(body)
        role["token_policies"] = body["token_policies"].split(",")
        self.approles[name] = role
        self.role_ids.setdefault(name, f"role-id-{name}")
        return self._empty(request)

    def _role_id(self, request: Any, body: Any, name: str) -> requests.Response:
        return self._data(request, {"role_id": self.role_ids[name]})

    def _new_secret(self, request: Any, body: Any, name: str) -> requests.Response:
        secret_id = f"secret-{secrets.token_hex(8)}"
        self.secret_ids.add(secret_id)
        return self._data(request, {"secret_id": secret_id, "secret_id_accessor": "acc"})

    def _lookup(self, request: Any, body: Any, name: str) -> requests.Response:
        if body["secret_id"] not in self.secret_ids:
            return self._empty(request)
        return self._data(request, {"secret_id_num_uses": 0, "secret_id_ttl": 0})


FRESH_RUN = [
    ("PUT", "sys/init"),
    ("PUT", "sys/unseal"),
    ("POST", "sys/mounts/pki"),
    ("POST", "pki/config/urls"),
    ("POST", "pki/root/generate/internal"),
    ("POST", "sys/mounts/pki_int"),
    ("POST", "pki_int/config/urls"),
    ("POST", "pki_int/intermediate/generate/internal"),
    ("POST", "pki/root/sign-intermediate"),
    ("POST", "pki_int/intermediate/set-signed"),
    ("POST", "pki_int/roles/spiffe-svid"),
    ("PUT", "sys/policy/ztbank-issuer"),
    ("POST", "sys/auth/approle"),
    ("POST", "auth/approle/role/ztbank-issuer"),
    ("POST", "auth/approle/role/ztbank-issuer/secret-id"),
]


@pytest.fixture(autouse=True)
def _no_ambient_vault(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(requests_mock: rm.Mocker) -> FakeVault:
    vault = FakeVault()
    requests_mock.add_matcher(vault)
    return vault


def _run(tmp_path: Path, *extra: str, trust_domain: str = TRUST_DOMAIN) -> int:
    argv = [
        "--vault-addr",
        ADDR,
        "--public-url",
        PUBLIC_URL,
        "--trust-domain",
        trust_domain,
        "--approle-out",
        str(tmp_path / "approle.json"),
        *extra,
    ]
    code: int = bootstrap.main(argv)
    return code


def _init_arg(tmp_path: Path) -> tuple[str, str]:
    return "--init-file", str(tmp_path / "init.json")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bootstrap.py: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_fresh_vault_is_initialised_unsealed_and_configured(
    fake: FakeVault, tmp_path: Path
) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    assert fake.mutations() == FRESH_RUN
    init = json.loads((tmp_path / "init.json").read_text())
    assert init["unseal_keys_b64"] == [fake.unseal_key]
    assert init["root_token"] == fake.root_token
    approle = json.loads((tmp_path / "approle.json").read_text())
    assert approle["role_id"] == fake.role_ids["ztbank-issuer"]
    assert approle["secret_id"] in fake.secret_ids
    assert _mode(tmp_path / "init.json") == 0o600
    assert _mode(tmp_path / "approle.json") == 0o600


def test_fresh_run_sends_the_intended_configuration(fake: FakeVault, tmp_path: Path) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    spiffe = f"spiffe://{TRUST_DOMAIN}"
    assert fake.body("POST", "sys/mounts/pki")["config"] == {"max_lease_ttl": "87600h"}
    assert fake.body("POST", "sys/mounts/pki_int")["config"] == {"max_lease_ttl": "43800h"}
    root = fake.body("POST", "pki/root/generate/internal")
    assert root["common_name"] == "ztbank root CA"
    assert (root["key_type"], root["key_bits"], root["uri_sans"]) == ("ec", 384, spiffe)
    assert fake.body("POST", "pki_int/config/urls") == {
        "issuing_certificates": [f"{PUBLIC_URL}/v1/pki_int/ca"],
        "crl_distribution_points": [f"{PUBLIC_URL}/v1/pki_int/crl"],
        "ocsp_servers": [f"{PUBLIC_URL}/v1/pki_int/ocsp"],
    }
    signing = fake.body("POST", "pki/root/sign-intermediate")
    assert (signing["max_path_length"], signing["uri_sans"]) == (1, spiffe)
    intermediate, _ = fake.ca["pki_int"]
    intermediate.verify_directly_issued_by(fake.ca["pki"][0])
    role = fake.body("POST", "pki_int/roles/spiffe-svid")
    assert role["allowed_uri_sans"] == [f"{spiffe}/*"]
    assert role["allowed_domains"] == []
    assert role["require_cn"] is False
    assert (role["key_type"], role["key_bits"]) == ("ec", 256)
    assert (role["ttl"], role["max_ttl"]) == (300, 600)
    assert role["server_flag"] is True
    assert role["client_flag"] is True
    policy = fake.policies["ztbank-issuer"]
    for path, capability in [
        ("pki_int/root/sign-intermediate", "update"),
        ("pki/ca/pem", "read"),
        ("pki_int/ca/pem", "read"),
        ("pki_int/cert/ca_chain", "read"),
    ]:
        assert f'path "{path}" {{\n  capabilities = ["{capability}"]\n}}' in policy
    assert fake.auth["approle/"] == {"type": "approle"}
    approle = fake.approles["ztbank-issuer"]
    assert approle["token_policies"] == ["ztbank-issuer"]
    assert approle["token_ttl"] == 3600


def test_second_run_changes_nothing(
    fake: FakeVault, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0
    credentials = (tmp_path / "approle.json").read_text()
    fake.calls.clear()
    capsys.readouterr()

    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    assert fake.mutations() == []
    assert fake.calls
    assert (tmp_path / "approle.json").read_text() == credentials
    out = capsys.readouterr().out
    assert "changed" not in out
    assert "ok  root CA in pki" in out


def test_sealed_vault_is_only_unsealed(fake: FakeVault, tmp_path: Path) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0
    fake.sealed = True
    fake.calls.clear()

    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    assert fake.mutations() == [("PUT", "sys/unseal")]


def test_drifted_role_and_mount_are_put_back(fake: FakeVault, tmp_path: Path) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0
    fake.pki_roles["pki_int/spiffe-svid"]["max_ttl"] = 86400
    fake.mounts["pki_int/"]["config"]["max_lease_ttl"] = 3600
    fake.calls.clear()

    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    assert fake.mutations() == [
        ("POST", "sys/mounts/pki_int/tune"),
        ("POST", "pki_int/roles/spiffe-svid"),
    ]
    assert fake.pki_roles["pki_int/spiffe-svid"]["max_ttl"] == 600


def test_revoked_secret_id_is_replaced(fake: FakeVault, tmp_path: Path) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0
    fake.secret_ids.clear()
    fake.calls.clear()

    assert _run(tmp_path, *_init_arg(tmp_path)) == 0

    assert fake.mutations() == [("POST", "auth/approle/role/ztbank-issuer/secret-id")]
    assert json.loads((tmp_path / "approle.json").read_text())["secret_id"] in fake.secret_ids


def test_configured_vault_is_driven_with_vault_token(
    fake: FakeVault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.configured()
    monkeypatch.setenv("VAULT_TOKEN", fake.root_token)

    assert _run(tmp_path) == 0

    assert fake.mutations() == FRESH_RUN[2:]
    assert not (tmp_path / "init.json").exists()


def test_existing_init_file_is_never_overwritten(
    fake: FakeVault, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "init.json").write_text('{"root_token": "another vault"}')

    assert _run(tmp_path, *_init_arg(tmp_path)) == 1

    assert fake.mutations() == []
    assert (tmp_path / "init.json").read_text() == '{"root_token": "another vault"}'
    assert "move it away" in _one_error_line(capsys)


def test_other_trust_domain_is_refused(
    fake: FakeVault, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, *_init_arg(tmp_path)) == 0
    fake.calls.clear()
    capsys.readouterr()

    assert _run(tmp_path, *_init_arg(tmp_path), trust_domain="other.test") == 1

    assert fake.mutations() == []
    assert "spiffe://other.test" in _one_error_line(capsys)


def test_rejected_token_exits_1_with_one_line(
    fake: FakeVault,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.configured()
    monkeypatch.setenv("VAULT_TOKEN", "hvs.wrong-token")

    assert _run(tmp_path) == 1

    line = _one_error_line(capsys)
    assert "permission denied" in line
    assert "hvs.wrong-token" not in line


@pytest.mark.parametrize(
    ("state", "argv", "message"),
    [
        ("fresh", [], "--init-file"),
        ("sealed", [], "--init-file"),
        ("configured", [], "VAULT_TOKEN"),
        ("fresh", ["--trust-domain", "Bank.Test"], "--trust-domain"),
        ("fresh", ["--vault-addr", "vault.test:8200"], "--vault-addr"),
        ("fresh", ["--vault-addr", ""], "--vault-addr"),
        ("fresh", ["--public-url", "ftp://vault"], "--public-url"),
        ("fresh", ["--ca-cert", "/nonexistent/ca.pem"], "--ca-cert"),
        ("fresh", ["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    fake: FakeVault,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    state: str,
    argv: list[str],
    message: str,
) -> None:
    if state != "fresh":
        fake.configured()
    fake.sealed = state != "configured"

    assert _run(tmp_path, *argv) == 2

    assert message in _one_error_line(capsys)
    assert fake.mutations() == []


def test_missing_approle_out_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bootstrap.main(["--vault-addr", ADDR]) == 2

    assert "--approle-out" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "error",
    [
        requests.exceptions.ConnectionError("connection refused"),
        requests.exceptions.ConnectTimeout("timed out"),
        requests.exceptions.SSLError("certificate verify failed"),
    ],
)
def test_unreachable_vault_exits_2_with_one_line(
    requests_mock: rm.Mocker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
) -> None:
    requests_mock.get(f"{ADDR}/v1/sys/init", exc=error)

    assert _run(tmp_path, *_init_arg(tmp_path)) == 2

    assert f"cannot reach Vault at {ADDR}" in _one_error_line(capsys)
    assert not (tmp_path / "init.json").exists()


def test_help_calls_the_init_file_demo_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        bootstrap.main(["--help"])

    assert exited.value.code == 0
    assert "demo-only" in capsys.readouterr().out
