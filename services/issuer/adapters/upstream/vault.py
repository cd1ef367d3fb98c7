"""The ``vault`` upstream: Vault's PKI engine signs the issuer's CA, so no root key is on disk.

The issuer's CA is signed by ``<pki_mount>/root/sign-intermediate`` (``pki_int`` by default, itself
an intermediate of the root in ``<root_mount>``).  Nothing Vault returns is trusted on its word:

* The only trust anchor is the operator-pinned root (``pinned_roots_file``, re-read at every
  signing so that it can be re-pinned without a restart).  A self-signed certificate in Vault's
  ``ca_chain`` or in ``<root_mount>/ca/pem`` is never trusted itself: it is only named in the
  error when the chain does not end at a pinned root.
* The signed CA must carry the CSR's key and exactly the URI SAN ``spiffe://<trust domain>``, be a
  CA with path length 0 that may sign certificates, live at least as long as asked (less a minute
  of clock slack) and not beyond its parent.  Every link of the path must verify, and every CA
  above it must be a currently valid CA with room for the CAs below it.

Each signing opens a fresh HTTP session and, for AppRole, logs in afresh: ``ca_cert`` (Vault's TLS
CA) and the AppRole file are read again, and no connection or token outlives the signing.
Failures are one-line UpstreamErrors naming the cause; no token or secret_id ever appears in one.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from services.common.durations import format_duration
from services.common.errors import InvalidCertificateError, InvalidSpiffeIdError
from services.common.identity.pem import fingerprint_sha256, load_pem_certificates
from services.common.identity.spiffe_id import SCHEME_PREFIX, validate_trust_domain
from services.common.identity.x509svid import issued_directly_by
from services.issuer.domain.upstream import SignedCA
from services.issuer.errors import UpstreamError

DEFAULT_COMMON_NAME = "ztbank issuer CA"
# Clocks of Vault and the issuer may differ by this much before a lifetime is refused.
CLOCK_SLACK = timedelta(seconds=60)
_REDACTED = "<redacted>"
# Error bodies can be whole HTML pages from a proxy; a line is enough to diagnose.
_MAX_DETAIL = 300
# The AppRole and CA files are small; a larger one is a wrong path (or /dev/zero), not read whole.
_MAX_FILE_BYTES = 1 << 20

_ExtensionT = TypeVar("_ExtensionT", bound=x509.ExtensionType)


@dataclass(frozen=True, kw_only=True)
class VaultAuth:
    """How the issuer logs in to Vault: a static ``token``; an AppRole ``role_id``/``secret_id``;
    or an ``approle_file`` holding ``{"role_id": ..., "secret_id": ...}``, read at every login.

    The secrets are left out of ``repr`` so that logging the settings never leaks them.
    """

    token: str | None = field(default=None, repr=False)
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    approle_file: Path | None = None
    approle_mount: str = "approle"

    def __post_init__(self) -> None:
        inline = self.role_id is not None or self.secret_id is not None
        modes = [self.token is not None, inline, self.approle_file is not None]
        if modes.count(True) != 1:
            raise UpstreamError(
                "Vault auth takes exactly one of a token, a role_id and secret_id,"
                " or an AppRole file"
            )
        if self.token is not None and not self.token:
            raise UpstreamError("the Vault token is empty")
        if inline and not (self.role_id and self.secret_id):
            raise UpstreamError("Vault AppRole auth needs both role_id and secret_id")
        if self.uses_approle and not self.approle_mount.strip("/"):
            raise UpstreamError("the Vault AppRole mount is empty")

    @property
    def uses_approle(self) -> bool:
        return self.token is None

    def approle_credentials(self) -> tuple[str, str]:
        """``(role_id, secret_id)``: as given, or read afresh from ``approle_file``."""
        if self.approle_file is not None:
            return read_approle_file(self.approle_file)
        if not (self.role_id and self.secret_id):
            raise UpstreamError("Vault token auth has no AppRole credentials")
        return self.role_id, self.secret_id


def read_approle_file(path: Path) -> tuple[str, str]:
    """``(role_id, secret_id)`` from the JSON file infra/vault/bootstrap.py writes.

    Errors name the file and what is wrong with it, never a byte of its content.
    """
    what = f"the Vault AppRole file {path}"
    data = _read_small_file(path, what)
    try:
        content = json.loads(data)
    except json.JSONDecodeError as error:
        raise UpstreamError(
            f"{what} is not JSON (line {error.lineno}, column {error.colno})"
        ) from None
    except ValueError:  # not UTF-8; the message would quote the offending byte
        raise UpstreamError(f"{what} is not UTF-8 JSON") from None
    if not isinstance(content, dict):
        raise UpstreamError(f"{what} does not hold a JSON object")
    credentials: list[str] = []
    for key in ("role_id", "secret_id"):
        value = content.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UpstreamError(f"{what} has no {key!r} string")
        credentials.append(value)
    return credentials[0], credentials[1]


def load_pinned_roots(path: Path) -> list[x509.Certificate]:
    """The root CAs in the PEM file ``path``; each must be a self-signed CA certificate."""
    what = f"the pinned Vault root CA file {path}"
    data = _read_small_file(path, what)
    try:
        roots = load_pem_certificates(data)
    except InvalidCertificateError:
        raise UpstreamError(f"{what} holds no PEM certificate") from None
    for root in roots:
        constraints = _extension(root, x509.BasicConstraints, what)
        if not (_self_signed(root) and constraints is not None and constraints.ca):
            raise UpstreamError(f"{what} holds {_label(root)}, which is not a self-signed CA")
    return roots


def _read_small_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as error:
        raise UpstreamError(
            f"cannot read {what}: {error.strerror or type(error).__name__}"
        ) from None
    if len(data) > _MAX_FILE_BYTES:
        raise UpstreamError(f"{what} is larger than {_MAX_FILE_BYTES} bytes")
    return data


@dataclass
class _Session:
    """One signing's client (its own requests session) and the secrets it has seen."""

    client: Any
    secrets: list[str]


class VaultUpstream:
    """Signs the issuer's CA with Vault's PKI.  Synchronous: the issuer calls it in a thread.

    Holds no connection or token between signings, so concurrent calls share nothing mutable.
    """

    name = "vault"

    def __init__(
        self,
        address: str,
        *,
        pki_mount: str = "pki_int",
        root_mount: str = "pki",
        auth: VaultAuth,
        ca_cert: str | None = None,
        pinned_roots_file: Path,
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
        self._ca_cert = ca_cert or None
        self._pinned_roots_file = pinned_roots_file
        self._timeout = timeout

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
        # Both files are read before Vault is called: a broken pin costs no round trip.
        pinned = load_pinned_roots(self._pinned_roots_file)
        self._check_ca_file()
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
        path = f"{self._pki_mount}/root/sign-intermediate"
        where = self._where(path)
        asked_at = datetime.now(UTC)
        with self._session() as session:
            if self._auth.uses_approle:
                self._login(session)
            response = self._call(
                session,
                path,
                lambda: session.client.secrets.pki.sign_intermediate(
                    csr=csr_pem,
                    common_name=_common_name(csr),
                    # hvac adds csr and common_name to extra_params in place.
                    extra_params=dict(params),
                    mount_point=self._pki_mount,
                ),
            )
            certificate, pool = _parse_signed(_response_data(response, where), where)
            subject = f"the CA signed by {where}"
            _check_signed(
                certificate,
                csr,
                trust_domain=trust_domain,
                ttl=ttl,
                now=asked_at,
                where=where,
                subject=subject,
            )
            chain, top = _path_upwards(
                certificate, [c for c in pool if not _self_signed(c)], subject
            )
            anchor = next((root for root in pinned if issued_directly_by(top, root)), None)
            if anchor is None:
                raise UpstreamError(
                    f"{subject} does not chain to the pinned root in {self._pinned_roots_file}"
                    f" (its chain ends at {self._chain_end(session, top, pool)})"
                )
        now = datetime.now(UTC)
        _check_path(chain, now=now, subject=subject)
        _check_anchor(anchor, len(chain) + 1, now=now, where=self._pinned_roots_file)
        parent = chain[0] if chain else anchor
        if certificate.not_valid_after_utc > parent.not_valid_after_utc:
            raise UpstreamError(
                f"{subject} expires at {_time(certificate.not_valid_after_utc)}, beyond its"
                f" parent's ({_label(parent)} expires at {_time(parent.not_valid_after_utc)})"
            )
        return SignedCA(certificate=certificate, chain=tuple(chain), roots=(anchor,))

    def _where(self, path: str) -> str:
        return f"{path} at {self._address}"

    def _check_ca_file(self) -> None:
        """Fail with a clear line before requests does with a vague one (or an OSError)."""
        if self._ca_cert is None or not self._address.startswith("https:"):
            return
        path = Path(self._ca_cert)
        if path.is_dir():  # a c_rehash directory: OpenSSL reads it lazily
            return
        what = f"Vault's CA certificate file {path}"
        try:
            load_pem_certificates(_read_small_file(path, what))
        except InvalidCertificateError:
            raise UpstreamError(f"{what} holds no PEM certificate") from None

    @contextmanager
    def _session(self) -> Iterator[_Session]:
        http = requests.Session()
        # hvac takes ``verify`` from a session it is handed, so it is set here.
        http.verify = self._ca_cert or True
        try:
            # An explicit token (empty for AppRole) stops hvac from picking up VAULT_TOKEN or
            # ~/.vault-token behind the settings layer's back.
            client = hvac.Client(
                url=self._address,
                token=self._auth.token or "",
                verify=self._ca_cert or True,
                timeout=self._timeout,
                session=http,
            )
            yield _Session(client, [self._auth.token] if self._auth.token else [])
        finally:
            http.close()

    def _call(self, session: _Session, path: str, call: Callable[[], object]) -> object:
        try:
            with self._vault_errors(session, path):
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

    def _login(self, session: _Session) -> None:
        mount = self._auth.approle_mount.strip("/")
        path = f"auth/{mount}/login"
        role_id, secret_id = self._auth.approle_credentials()
        session.secrets.append(secret_id)
        try:
            with self._vault_errors(session, path):
                try:
                    response = session.client.auth.approle.login(
                        role_id=role_id, secret_id=secret_id, use_token=False, mount_point=mount
                    )
                except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as error:
                    raise _RefusedError(_hvac_detail(error)) from None
        except (_RefusedError, _ForbiddenError) as refused:
            source = f" in {self._auth.approle_file}" if self._auth.approle_file else ""
            detail = self._clean(session, str(refused))
            raise UpstreamError(
                f"Vault refused the AppRole login at {self._where(path)}"
                f" (wrong role_id or secret_id{source}?)" + (f": {detail}" if detail else "")
            ) from None
        auth = response.get("auth") if isinstance(response, dict) else None
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"the AppRole login at {self._where(path)} returned no token")
        session.secrets.append(token)
        session.client.token = token

    def _chain_end(
        self, session: _Session, top: x509.Certificate, pool: list[x509.Certificate]
    ) -> str:
        """Names what the chain ends at, for the error; nothing found here is ever trusted.

        A root Vault presents (in ``ca_chain`` or ``<root_mount>/ca/pem``) could only be trusted by
        equalling a pinned root, and then that pinned root would itself have signed ``top``.
        """
        root = next((c for c in pool if _self_signed(c) and issued_directly_by(top, c)), None)
        if root is None:
            with suppress(UpstreamError):
                root = next(
                    (c for c in self._fetch_roots(session) if issued_directly_by(top, c)), None
                )
        if root is None:
            return f"{_name(top.issuer)}, which Vault did not return"
        return f"{_label(root)}, SHA-256 fingerprint {fingerprint_sha256(root)}"

    def _fetch_roots(self, session: _Session) -> list[x509.Certificate]:
        path = f"{self._root_mount}/ca/pem"
        pem = self._call(
            session,
            path,
            lambda: session.client.secrets.pki.read_ca_certificate(mount_point=self._root_mount),
        )
        if not isinstance(pem, str) or not pem.strip():
            raise UpstreamError(f"{self._where(path)} holds no CA certificate")
        return [c for c in _load(pem, self._where(path)) if _self_signed(c)]

    @contextmanager
    def _vault_errors(self, session: _Session, path: str) -> Iterator[None]:
        """Translate hvac/requests failures into one-line UpstreamErrors naming the cause; 403 is
        left to the caller.  Messages are built from redacted details only."""
        where = self._where(path)
        try:
            yield
        except hvac.exceptions.Forbidden:
            raise _ForbiddenError from None
        except hvac.exceptions.VaultDown as error:
            detail = self._clean(session, _hvac_detail(error))
            if "sealed" in detail.lower():
                message = f"Vault at {self._address} is sealed ({path} answered 503): unseal it"
            else:
                message = f"Vault at {self._address} is unavailable ({path} answered 503: {detail})"
            raise UpstreamError(message) from None
        except hvac.exceptions.VaultNotInitialized:
            raise UpstreamError(
                f"Vault at {self._address} is not initialised ({path} answered 501)"
            ) from None
        except hvac.exceptions.VaultError as error:
            detail = self._clean(session, f"{type(error).__name__}: {_hvac_detail(error)}")
            raise UpstreamError(f"Vault error on {where}: {detail}") from None
        except requests.exceptions.SSLError as error:
            cause = _innermost(error)
            reason = self._clean(session, _describe(cause))
            if isinstance(cause, ssl.SSLCertVerificationError):
                trusted_by = self._ca_cert or "the system's CA certificates (no VAULT_CACERT)"
                message = (
                    f"Vault's TLS certificate at {self._address} is not trusted by {trusted_by}:"
                    f" {reason}"
                )
            else:
                message = f"TLS with Vault at {self._address} failed ({path}): {reason}"
            raise UpstreamError(message) from None
        except requests.exceptions.ConnectTimeout:
            raise UpstreamError(
                f"Vault at {self._address} is unreachable ({path}):"
                f" no connection within {self._timeout:g}s"
            ) from None
        except requests.exceptions.Timeout:
            raise UpstreamError(
                f"Vault at {self._address} did not answer {path} within {self._timeout:g}s"
            ) from None
        except requests.exceptions.ConnectionError as error:
            reason = self._clean(session, _describe(_innermost(error)))
            raise UpstreamError(
                f"Vault at {self._address} is unreachable ({path}): {reason}"
            ) from None
        except requests.RequestException as error:
            reason = self._clean(session, str(error))
            raise UpstreamError(f"cannot reach Vault for {where}: {reason}") from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            reason = self._clean(session, str(error))
            raise UpstreamError(f"malformed response from {where}: {reason}") from None

    def _clean(self, session: _Session, text: str) -> str:
        """``text`` without any secret this signing has used, on one line, cut to a length."""
        return _one_line(self._redact(session, text))[:_MAX_DETAIL]

    def _redact(self, session: _Session, message: str) -> str:
        known = [self._auth.token, self._auth.secret_id, session.client.token, *session.secrets]
        # Longest first, so that a secret containing another is replaced whole.
        for secret in sorted({s for s in known if isinstance(s, str) and s}, key=len, reverse=True):
            message = message.replace(secret, _REDACTED)
        return message


class _ForbiddenError(Exception):
    """Vault answered 403: the token lacks a capability."""


class _RefusedError(Exception):
    """Vault refused an AppRole login (400 or 403); the argument is Vault's own reason."""


def _hvac_detail(error: hvac.exceptions.VaultError) -> str:
    """Vault's ``errors`` list; hvac only decodes it under exactly ``application/json``."""
    text = str(error.args[0]) if error.args and error.args[0] is not None else ""
    errors = getattr(error, "errors", None)
    if errors is None:
        with suppress(ValueError):
            decoded = json.loads(text)
            errors = decoded.get("errors") if isinstance(decoded, dict) else None
    if isinstance(errors, list) and errors:
        return ", ".join(str(e) for e in errors)
    return text


def _innermost(error: BaseException) -> BaseException:
    """The root cause under requests' and urllib3's wrappers (MaxRetryError.reason, args, cause)."""
    seen: set[int] = set()
    current = error
    while id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "reason", None)
        wrapped = current.args[0] if current.args else None
        following = next(
            (
                candidate
                for candidate in (reason, wrapped, current.__cause__, current.__context__)
                if isinstance(candidate, BaseException)
            ),
            None,
        )
        if following is None:
            break
        current = following
    return current


def _describe(cause: BaseException) -> str:
    if isinstance(cause, ssl.SSLCertVerificationError):
        return str(cause.verify_message or cause.reason or cause)
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name ({cause.strerror})"
    if isinstance(cause, ssl.SSLError):
        return str(cause.reason or cause)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause) or type(cause).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def _name(name: x509.Name) -> str:
    return name.rfc4514_string() or "an empty name"


def _label(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or f"serial {certificate.serial_number:x}"


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _extension(
    certificate: x509.Certificate, kind: type[_ExtensionT], where: object
) -> _ExtensionT | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as error:  # duplicate or undecodable extensions
        raise UpstreamError(
            f"{where}: {_label(certificate)} has unreadable extensions: {error}"
        ) from None


def _check_signed(
    certificate: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    *,
    trust_domain: str,
    ttl: timedelta,
    now: datetime,
    where: str,
    subject: str,
) -> None:
    """The properties the issuer relies on in its own CA, each refused with the rule it breaks."""
    if _spki(certificate.public_key()) != _spki(csr.public_key()):
        raise UpstreamError(f"{where} returned a certificate for a different key than the CSR's")
    constraints = _extension(certificate, x509.BasicConstraints, where)
    if constraints is None or not constraints.ca:
        raise UpstreamError(f"{where} returned a certificate that is not a CA")
    if constraints.path_length != 0:
        limit = (
            "no path length limit"
            if constraints.path_length is None
            else f"path length {constraints.path_length}"
        )
        raise UpstreamError(
            f"{subject} allows further CAs below the issuer ({limit}); its path length must be 0"
        )
    usage = _extension(certificate, x509.KeyUsage, where)
    if usage is not None and not usage.key_cert_sign:
        raise UpstreamError(f"{subject} may not sign certificates (its KeyUsage lacks keyCertSign)")
    names = _extension(certificate, x509.SubjectAlternativeName, where)
    uris = names.get_values_for_type(x509.UniformResourceIdentifier) if names else []
    expected = f"{SCHEME_PREFIX}{trust_domain}"
    if uris != [expected]:
        carried = ", ".join(uris) if uris else "none"
        raise UpstreamError(
            f"{subject} must carry exactly one URI SAN, {expected} (it carries: {carried})"
        )
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not_after < now + ttl - CLOCK_SLACK:
        raise UpstreamError(
            f"{subject} expires at {_time(not_after)}, shorter than asked"
            f" ({format_duration(ttl)} from {_time(now)}; Vault caps a TTL at the mount's max"
            " TTL and at its issuer's expiry)"
        )
    if not_before > now + CLOCK_SLACK:
        raise UpstreamError(f"{subject} is not valid until {_time(not_before)}")


def _self_signed(certificate: x509.Certificate) -> bool:
    return issued_directly_by(certificate, certificate)


def _path_upwards(
    certificate: x509.Certificate, intermediates: list[x509.Certificate], subject: str
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """Intermediates from ``certificate``'s issuer upwards (leaf-most first), and the topmost one.

    Each link is verified (``verify_directly_issued_by``).  Certificates that do not extend the
    path are dropped rather than published; one that bears the issuer's name without having
    signed is refused.
    """
    chain: list[x509.Certificate] = []
    remaining = list(intermediates)
    top = certificate
    while True:
        parent = next((c for c in remaining if issued_directly_by(top, c)), None)
        if parent is None:
            impostor = next((c for c in remaining if c.subject == top.issuer), None)
            if impostor is not None:
                raise UpstreamError(
                    f"{subject}: {_label(top)} does not verify as issued by {_label(impostor)},"
                    " the certificate Vault returned as its issuer"
                )
            return chain, top
        chain.append(parent)
        remaining.remove(parent)
        top = parent


def _check_path(chain: list[x509.Certificate], *, now: datetime, subject: str) -> None:
    """Every CA between the issuer's CA and the root: a CA, valid now, with room below it."""
    for below, certificate in enumerate(chain, start=1):
        through = f"{subject} chains through {_label(certificate)}"
        constraints = _extension(certificate, x509.BasicConstraints, subject)
        if constraints is None or not constraints.ca:
            raise UpstreamError(f"{through}, which is not a CA")
        problem = _ca_problem(certificate, constraints, below, now=now)
        if problem:
            raise UpstreamError(f"{through}, which {problem}")


def _check_anchor(root: x509.Certificate, below: int, *, now: datetime, where: Path) -> None:
    what = f"the pinned root {_label(root)} in {where}"
    constraints = _extension(root, x509.BasicConstraints, what)
    if constraints is None or not constraints.ca:  # load_pinned_roots refuses these already
        raise UpstreamError(f"{what} is not a CA")
    problem = _ca_problem(root, constraints, below, now=now)
    if problem:
        raise UpstreamError(f"{what} {problem}")


def _ca_problem(
    certificate: x509.Certificate, constraints: x509.BasicConstraints, below: int, *, now: datetime
) -> str | None:
    """Why a CA with ``below`` CAs under it in the path cannot vouch for them now, if it cannot."""
    if certificate.not_valid_after_utc < now:
        return f"expired at {_time(certificate.not_valid_after_utc)}"
    if certificate.not_valid_before_utc > now + CLOCK_SLACK:
        return f"is not valid until {_time(certificate.not_valid_before_utc)}"
    usage = _extension(certificate, x509.KeyUsage, _label(certificate))
    if usage is not None and not usage.key_cert_sign:
        return "may not sign certificates (its KeyUsage lacks keyCertSign)"
    # RFC 5280: the path length counts the CAs that may follow; the issuer's CA is one of them.
    if constraints.path_length is not None and constraints.path_length < below:
        return (
            f"has path length {constraints.path_length}, too short for the {below} CA(s) below it"
        )
    return None
