"""The ``vault`` upstream: Vault's PKI engine signs the issuer's CA, so no root key is on disk.

The issuer's CA is signed by ``<pki_mount>/root/sign-intermediate`` (``pki_int`` by default, itself
an intermediate of the root in ``<root_mount>``).  Everything Vault returns is checked before it is
trusted: the certificate must carry the CSR's key, be a CA, and chain to a self-signed root.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from services.common.errors import InvalidCertificateError, InvalidSpiffeIdError
from services.common.identity.pem import load_pem_certificates
from services.common.identity.spiffe_id import SCHEME_PREFIX, validate_trust_domain
from services.common.identity.x509svid import issued_directly_by
from services.issuer.adapters.upstream import SignedCA
from services.issuer.errors import UpstreamError

DEFAULT_COMMON_NAME = "ztbank issuer CA"
_REDACTED = "<redacted>"
# Error bodies can be whole HTML pages from a proxy; a line is enough to diagnose.
_MAX_DETAIL = 300


@dataclass(frozen=True, kw_only=True)
class VaultAuth:
    """How the issuer logs in to Vault: a static ``token``, or an AppRole ``role_id``/``secret_id``.

    The secrets are left out of ``repr`` so that logging the settings never leaks them.
    """

    token: str | None = field(default=None, repr=False)
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    approle_mount: str = "approle"

    def __post_init__(self) -> None:
        approle = self.role_id is not None or self.secret_id is not None
        if (self.token is not None) == approle:
            raise UpstreamError("Vault auth takes either a token, or a role_id and secret_id")
        if self.token is not None and not self.token:
            raise UpstreamError("the Vault token is empty")
        if approle and not (self.role_id and self.secret_id):
            raise UpstreamError("Vault AppRole auth needs both role_id and secret_id")
        if approle and not self.approle_mount.strip("/"):
            raise UpstreamError("the Vault AppRole mount is empty")

    @property
    def uses_approle(self) -> bool:
        return self.token is None


class VaultUpstream:
    """Signs the issuer's CA with Vault's PKI.  Synchronous: the issuer calls it in a thread."""

    name = "vault"

    def __init__(
        self,
        address: str,
        *,
        pki_mount: str = "pki_int",
        root_mount: str = "pki",
        auth: VaultAuth,
        ca_cert: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UpstreamError(f"Vault address {address!r} is not an http(s) URL")
        if not pki_mount.strip("/") or not root_mount.strip("/"):
            raise UpstreamError("Vault PKI mount names must not be empty")
        if timeout <= 0:
            raise UpstreamError("the Vault timeout must be positive")
        self._address = address.rstrip("/")
        self._pki_mount = pki_mount.strip("/")
        self._root_mount = root_mount.strip("/")
        self._auth = auth
        # An explicit token (empty for AppRole) stops hvac from picking up VAULT_TOKEN or
        # ~/.vault-token behind the settings layer's back.
        self._client: Any = hvac.Client(
            url=self._address,
            token=auth.token or "",
            verify=ca_cert or True,
            timeout=timeout,
        )
        self._logged_in = not auth.uses_approle
        # One hvac client (and its token) is shared by every thread the issuer signs from.
        self._lock = threading.Lock()

    def sign_signing_ca(
        self, csr: x509.CertificateSigningRequest, *, trust_domain: str, ttl: timedelta
    ) -> SignedCA:
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeIdError as error:
            raise UpstreamError(str(error)) from None
        seconds = int(ttl.total_seconds())
        if seconds <= 0:
            raise UpstreamError(f"the signing CA TTL must be at least one second, not {ttl}")
        csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        params: dict[str, Any] = {
            "uri_sans": f"{SCHEME_PREFIX}{trust_domain}",
            "ttl": f"{seconds}s",
            "format": "pem",
            "use_csr_values": False,
            "exclude_cn_from_sans": True,
            # The issuer's CA only signs leaf SVIDs, never another CA.
            "max_path_length": 0,
        }
        where = f"{self._pki_mount}/root/sign-intermediate"
        with self._lock:
            response = self._authenticated(
                where,
                lambda: self._client.secrets.pki.sign_intermediate(
                    csr=csr_pem,
                    common_name=_common_name(csr),
                    # hvac adds csr and common_name to extra_params in place.
                    extra_params=dict(params),
                    mount_point=self._pki_mount,
                ),
            )
            located = self._where(where)
            certificate, pool = _parse_signed(_response_data(response, located), located)
            _check_matches_csr(certificate, csr, located)
            chain, top = _path_upwards(certificate, [c for c in pool if not _self_signed(c)])
            roots = [c for c in pool if _self_signed(c)] or self._fetch_roots()
        if not any(issued_directly_by(top, root) for root in roots):
            raise UpstreamError(
                f"the CA signed by {located} does not chain to a self-signed root"
                f" (checked the returned ca_chain and {self._root_mount}/ca/pem)"
            )
        return SignedCA(certificate=certificate, chain=tuple(chain), roots=tuple(roots))

    def _where(self, path: str) -> str:
        return f"{path} at {self._address}"

    def _authenticated(self, path: str, call: Callable[[], object]) -> object:
        """Run ``call`` with a valid token, logging in again once if Vault says it has expired."""
        fresh_login = not self._logged_in
        if fresh_login:
            self._login()
        try:
            with self._vault_errors(path):
                return call()
        except _ForbiddenError:
            if fresh_login or not self._auth.uses_approle:
                raise UpstreamError(self._denied(path)) from None
        self._login()
        try:
            with self._vault_errors(path):
                return call()
        except _ForbiddenError:
            raise UpstreamError(self._denied(path)) from None

    def _denied(self, path: str) -> str:
        who = (
            f"the AppRole token (mount {self._auth.approle_mount!r})"
            if self._auth.uses_approle
            else "the token"
        )
        return f"Vault denied {who} access to {self._where(path)}: check the issuer's policy"

    def _login(self) -> None:
        path = f"auth/{self._auth.approle_mount.strip('/')}/login"
        self._logged_in = False
        self._client.token = ""
        try:
            with self._vault_errors(path):
                response = self._client.auth.approle.login(
                    role_id=self._auth.role_id,
                    secret_id=self._auth.secret_id,
                    use_token=False,
                    mount_point=self._auth.approle_mount.strip("/"),
                )
        except _ForbiddenError:
            raise UpstreamError(f"Vault refused the AppRole login at {self._where(path)}") from None
        auth = response.get("auth") if isinstance(response, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"the AppRole login at {self._where(path)} returned no token")
        self._client.token = token
        self._logged_in = True

    def _fetch_roots(self) -> list[x509.Certificate]:
        path = f"{self._root_mount}/ca/pem"
        try:
            with self._vault_errors(path):
                pem = self._client.secrets.pki.read_ca_certificate(mount_point=self._root_mount)
        except _ForbiddenError:
            raise UpstreamError(self._denied(path)) from None
        if not isinstance(pem, str) or not pem.strip():
            raise UpstreamError(f"{self._where(path)} holds no CA certificate")
        roots = [c for c in _load(pem, self._where(path)) if _self_signed(c)]
        if not roots:
            raise UpstreamError(f"the CA at {self._where(path)} is not a self-signed root")
        return roots

    @contextmanager
    def _vault_errors(self, path: str) -> Iterator[None]:
        """Translate hvac/requests failures into UpstreamError; 403 is left to the caller."""
        try:
            yield
        except hvac.exceptions.Forbidden:
            raise _ForbiddenError from None
        except hvac.exceptions.VaultError as error:
            detail = f"{type(error).__name__}: {error.args[0] if error.args else ''}"
            raise UpstreamError(
                self._redact(f"Vault error on {self._where(path)}: {detail[:_MAX_DETAIL]}")
            ) from None
        except requests.RequestException as error:
            raise UpstreamError(
                self._redact(f"cannot reach Vault for {self._where(path)}: {error}"[:_MAX_DETAIL])
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise UpstreamError(
                self._redact(f"malformed response from {self._where(path)}: {error}")
            ) from None

    def _redact(self, message: str) -> str:
        for secret in (self._auth.token, self._auth.secret_id, self._client.token):
            if isinstance(secret, str) and secret:
                message = message.replace(secret, _REDACTED)
        return message


class _ForbiddenError(Exception):
    """Vault answered 403: the token expired or lacks a capability."""


def _common_name(csr: x509.CertificateSigningRequest) -> str:
    for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        if isinstance(attribute.value, str) and attribute.value.strip():
            return attribute.value
    return DEFAULT_COMMON_NAME


def _response_data(response: object, where: str) -> dict[str, Any]:
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict):
        raise UpstreamError(f"{where} did not answer with a JSON object holding 'data'")
    return data


def _parse_signed(
    data: dict[str, Any], where: str
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The new CA, and every other distinct certificate Vault sent along with it."""
    certificate_pem = data.get("certificate")
    if not isinstance(certificate_pem, str) or not certificate_pem.strip():
        raise UpstreamError(f"{where} returned no certificate")
    # The pem_bundle format appends the issuing chain after the new certificate.
    certificate, *extra = _load(certificate_pem, where)
    texts: list[object] = [data.get("issuing_ca")]
    ca_chain = data.get("ca_chain")
    texts.extend(ca_chain if isinstance(ca_chain, list) else [ca_chain])
    pool = [*extra]
    for text in texts:
        if isinstance(text, str) and text.strip():
            pool.extend(_load(text, where))
    # Vault's ca_chain starts with the new certificate itself.
    seen = {_der(certificate)}
    unique: list[x509.Certificate] = []
    for candidate in pool:
        if _der(candidate) not in seen:
            seen.add(_der(candidate))
            unique.append(candidate)
    return certificate, unique


def _load(pem: str, where: str) -> list[x509.Certificate]:
    try:
        return load_pem_certificates(pem.encode())
    except InvalidCertificateError as error:
        raise UpstreamError(f"{where} returned an unreadable certificate: {error}") from None


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_matches_csr(
    certificate: x509.Certificate, csr: x509.CertificateSigningRequest, where: str
) -> None:
    if _spki(certificate.public_key()) != _spki(csr.public_key()):
        raise UpstreamError(f"{where} returned a certificate for a different key than the CSR's")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise UpstreamError(f"{where} returned a certificate that is not a CA")


def _self_signed(certificate: x509.Certificate) -> bool:
    return issued_directly_by(certificate, certificate)


def _path_upwards(
    certificate: x509.Certificate, intermediates: list[x509.Certificate]
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """Intermediates from ``certificate``'s issuer upwards (leaf-most first), and the topmost one.

    Certificates that do not extend the path are dropped rather than published.
    """
    chain: list[x509.Certificate] = []
    remaining = list(intermediates)
    top = certificate
    while True:
        parent = next((c for c in remaining if issued_directly_by(top, c)), None)
        if parent is None:
            return chain, top
        chain.append(parent)
        remaining.remove(parent)
        top = parent
