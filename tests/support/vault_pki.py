"""A PKI laid out like ztbank's Vault (a root in ``pki``, an intermediate in ``pki_int``) that
answers ``root/sign-intermediate`` the way Vault does, plus a small HTTPS server speaking that API.

``Signing()`` signs what ztbank asks for, as Vault would; each field breaks exactly one property,
so a negative test states only what it changes.  Keys and certificates are generated at run time.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.pki import (
    CA_KEY_USAGE,
    Issued,
    KeyUsageSpec,
    create_intermediate_ca,
    create_root_ca,
)

SIGN_PATH = "/v1/pki_int/root/sign-intermediate"
LOGIN_PATH = "/v1/auth/approle/login"


def pem(*certificates: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


@dataclass(frozen=True)
class VaultPki:
    """What the fabricated Vault holds: ``root`` (mount ``pki``) and ``intermediate``
    (mount ``pki_int``), each with its key."""

    root: Issued
    intermediate: Issued

    @classmethod
    def create(
        cls,
        *,
        name: str = "test",
        intermediate_is_ca: bool = True,
        intermediate_path_length: int | None = 1,
        intermediate_key_usage: KeyUsageSpec | None = CA_KEY_USAGE,
        intermediate_not_after: datetime | None = None,
        root_not_after: datetime | None = None,
    ) -> VaultPki:
        """Both CAs valid from an hour ago; the intermediate for 30 days, the root for 60."""
        now = datetime.now(UTC)
        root = create_root_ca(
            common_name=f"{name} root",
            uri_sans=[],  # Vault's roots carry no SPIFFE ID
            not_after=root_not_after or now + timedelta(days=60),
        )
        intermediate = create_intermediate_ca(
            root,
            common_name=f"{name} pki_int",
            uri_sans=[],
            is_ca=intermediate_is_ca,
            path_length=intermediate_path_length if intermediate_is_ca else None,
            key_usage=intermediate_key_usage,
            not_after=intermediate_not_after or now + timedelta(days=30),
        )
        return cls(root, intermediate)

    def write_root(self, path: Path) -> Path:
        path.write_text(pem(self.root.certificate))
        return path


@dataclass(frozen=True)
class Signing:
    """How the fabricated Vault signs the CSR; the defaults do what Vault does."""

    # The key certified instead of the CSR's.
    public_key: CertificatePublicKeyTypes | None = None
    ca: bool = True
    # "asked": the request's max_path_length (0 for ztbank).
    path_length: int | Literal["asked"] | None = "asked"
    # None: the request's uri_sans.
    uri_sans: Sequence[str] | None = None
    key_usage: KeyUsageSpec | None = CA_KEY_USAGE
    # None: the request's ttl; Vault backdates notBefore by 30 s.
    lifetime: timedelta | None = None
    not_before: datetime | None = None
    # Who really signs (default: the intermediate) and whose name goes in the issuer field.
    signer: Issued | None = None
    issuer_name: x509.Name | None = None
    # What follows the new certificate in ca_chain (default: intermediate, then root).
    ca_chain: Sequence[x509.Certificate] | None = None
    include_root: bool = True


def sign_intermediate(
    pki: VaultPki, body: Mapping[str, Any], signing: Signing | None = None
) -> dict[str, Any]:
    """Vault's JSON answer to ``POST <pki_int>/root/sign-intermediate`` with ``body``."""
    signing = signing or Signing()
    csr = x509.load_pem_x509_csr(str(body["csr"]).encode())
    signer = signing.signer or pki.intermediate
    now = datetime.now(UTC)
    asked = timedelta(seconds=int(str(body["ttl"]).removesuffix("s")))
    path_length = body["max_path_length"] if signing.path_length == "asked" else signing.path_length
    uri_sans = [body["uri_sans"]] if signing.uri_sans is None else list(signing.uri_sans)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, body["common_name"])]))
        .issuer_name(signing.issuer_name or signer.certificate.subject)
        .public_key(signing.public_key or csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(signing.not_before or now - timedelta(seconds=30))
        .not_valid_after(now + (signing.lifetime or asked))
        .add_extension(
            x509.BasicConstraints(ca=signing.ca, path_length=path_length if signing.ca else None),
            critical=True,
        )
    )
    if uri_sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uri_sans]),
            critical=False,
        )
    if signing.key_usage is not None:
        usage = signing.key_usage
        builder = builder.add_extension(usage.extension(), critical=usage.critical)
    certificate = builder.sign(signer.key, hashes.SHA256())
    if signing.ca_chain is not None:
        above = list(signing.ca_chain)
    else:
        above = [pki.intermediate.certificate]
        if signing.include_root:
            above.append(pki.root.certificate)
    return {
        "data": {
            "certificate": pem(certificate),
            "issuing_ca": pem(above[0]) if above else "",
            "ca_chain": [pem(certificate), *(pem(c) for c in above)],
            "serial_number": format(certificate.serial_number, "x"),
        }
    }


def signer_callback(pki: VaultPki, signing: Signing | None = None) -> Callable[[Any, Any], Any]:
    """A requests_mock ``json=`` callback doing what Vault's root/sign-intermediate does."""

    def sign(request: Any, context: Any) -> dict[str, Any]:
        return sign_intermediate(pki, request.json(), signing)

    return sign


@dataclass(frozen=True)
class TlsFiles:
    """A TLS CA (``ca_file``) and a server certificate for 127.0.0.1 it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path, name: str = "vault-tls") -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca = create_root_ca(common_name=f"{name} CA", uri_sans=[])
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        server = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
            .sign(ca.key, hashes.SHA256())
        )
        files = cls(directory / f"{name}-ca.pem", directory / f"{name}.pem", directory / "key.pem")
        files.ca_file.write_text(pem(ca.certificate))
        files.cert_file.write_text(pem(server))
        files.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        files.key_file.chmod(0o600)
        return files


@dataclass
class FakeVault:
    """What the HTTPS fake Vault answers and what it was asked."""

    pki: VaultPki
    address: str = ""
    login_token: str = "hvs.fake-vault-token"
    signing: Signing = field(default_factory=Signing)
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)


@contextmanager
def serve_fake_vault(pki: VaultPki, tls: TlsFiles) -> Iterator[FakeVault]:
    """A real HTTPS server on 127.0.0.1 answering AppRole login and sign-intermediate."""
    vault = FakeVault(pki)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            vault.requests.append((self.path, body, dict(self.headers)))
            if self.path == LOGIN_PATH:
                answer: dict[str, Any] = {"auth": {"client_token": vault.login_token}}
            elif self.path == SIGN_PATH:
                answer = sign_intermediate(vault.pki, body, vault.signing)
            else:
                self.send_error(404)
                return
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    vault.address = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield vault
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
