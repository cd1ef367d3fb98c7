"""Mutual-TLS contexts built from the workload's SVID, hot-swapped on rotation.

Policy for every ztbank TLS endpoint: TLS 1.2 or newer, AEAD cipher suites only (TLS 1.3 suites
are all AEAD; for 1.2 only ECDHE with AES-GCM or ChaCha20-Poly1305), no session tickets and no
compression on the Python contexts made here (the gateway, and every client).  The gRPC servers'
TLS is grpcio's own: it issues session tickets in 1.2 and 1.3 and offers no switch for them.
OpenSSL checks the chain against the trust bundle during the handshake; the SPIFFE rules OpenSSL
does not know, and revocation, are checked afterwards by ``PeerVerifier`` on every connection
(and every gRPC call), so a resumed session is re-checked too (tests/e2e/test_revocation.py
resumes a revoked client's session on purpose and sees it refused).
"""

from __future__ import annotations

import functools
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from services.common.files import (
    PRIVATE_MODE,
    PUBLIC_MODE,
    ensure_private_dir,
    write_atomic,
)
from services.common.identity.pem import fingerprint_sha256, load_der_certificates, serial_hex
from services.common.identity.source import SvidMaterial, SvidSource
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_der_chain
from services.common.mtls.peer import PeerIdentity
from services.common.revocation import RevocationChecker, RevocationError

TLS12_AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# The HTTPS endpoints speak HTTP/1.1 only; ALPN tells a client so in the handshake.
HTTP_ALPN = ["http/1.1"]


@functools.cache
def _iana_cipher_codes() -> dict[str, str]:
    # OpenSSL reports suites by its own names; auditors and the IANA registry use the two-byte
    # code, which OpenSSL keeps in the low 16 bits of the suite id.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:@SECLEVEL=0")
    return {suite["name"]: f"0x{suite['id'] & 0xFFFF:04X}" for suite in context.get_ciphers()}


def iana_cipher_code(openssl_name: str | None) -> str | None:
    """``TLS_AES_128_GCM_SHA256`` -> ``0x1301``; None for a suite OpenSSL does not know."""
    return _iana_cipher_codes().get(openssl_name) if openssl_name else None


def _remember_sni(ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
    # The server name is only seen during the handshake: kept on the connection for the audit.
    ssl_object.ztbank_sni = server_name  # type: ignore[attr-defined]


def requested_server_name(ssl_object: ssl.SSLObject) -> str | None:
    """The SNI the client sent on this server-side connection (None if it sent none)."""
    name: str | None = getattr(ssl_object, "ztbank_sni", None)
    return name


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_AEAD_CIPHERS)
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class SvidFiles:
    """The SVID as files for APIs that only read paths (``load_cert_chain``); key 0600 in a
    0700 directory, replaced atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = ensure_private_dir(directory)
        self.chain = directory / "svid.pem"
        self.key = directory / "svid.key"
        self.bundle = directory / "bundle.pem"

    def write(self, material: SvidMaterial) -> None:
        write_atomic(self.key, material.key_pem, PRIVATE_MODE)
        write_atomic(self.chain, material.chain_pem, PUBLIC_MODE)
        write_atomic(self.bundle, material.bundle_pem, PUBLIC_MODE)


def client_context(material: SvidMaterial, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A one-off client context (CLI, probes) presenting ``material``."""
    return pem_client_context(material.chain_pem, material.key_pem, material.bundle_pem, alpn)


def pem_client_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A one-off client context presenting any chain (the labs present ones a correct CA never
    issues) and trusting ``bundle_pem``; the key touches disk only in a private temp dir."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False  # the server is identified by its SPIFFE ID instead
    if alpn:
        context.set_alpn_protocols(alpn)
    with tempfile.TemporaryDirectory(prefix="ztbank-svid-") as directory:
        chain, key = Path(directory) / "svid.pem", Path(directory) / "svid.key"
        write_atomic(key, key_pem, PRIVATE_MODE)
        write_atomic(chain, chain_pem, PUBLIC_MODE)
        context.load_cert_chain(chain, key)
    context.load_verify_locations(cadata=bundle_pem.decode())
    return context


class ReloadingContext:
    """An ``ssl.SSLContext`` that follows the SVID source.

    Each rotation builds a complete new context and swaps the reference, so a handshake never
    meets a half-updated one (a new certificate with the old key): a live context is never
    mutated.  Callers read ``context`` for every new connection; open connections keep theirs.
    """

    def __init__(self, source: SvidSource, files: SvidFiles, *, server: bool) -> None:
        self._server = server
        self._files = files
        self._lock = threading.Lock()
        self.context = self._build(source.current())
        source.subscribe(self._rotate)

    def _build(self, material: SvidMaterial) -> ssl.SSLContext:
        protocol = ssl.PROTOCOL_TLS_SERVER if self._server else ssl.PROTOCOL_TLS_CLIENT
        context = _harden(ssl.SSLContext(protocol))
        if self._server:
            # TLS 1.3 tickets would let a client resume without a certificate exchange.
            context.num_tickets = 0
            context.sni_callback = _remember_sni
            context.set_alpn_protocols(HTTP_ALPN)
        else:
            # Peers are identified by SPIFFE ID (PeerVerifier), not by host name.
            context.check_hostname = False
        with self._lock:
            self._files.write(material)
            context.load_cert_chain(self._files.chain, self._files.key)
        context.load_verify_locations(cadata=material.bundle_pem.decode())
        return context

    def _rotate(self, material: SvidMaterial) -> None:
        self.context = self._build(material)


@dataclass(frozen=True)
class _VerifiedChain:
    """What a successful X509-SVID verification established about one exact chain."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    serial: str
    fingerprint_sha256: str
    subject: str
    valid_from: datetime  # the latest notBefore of the chain
    valid_until: datetime  # the earliest notAfter of the chain


class PeerVerifier:
    """Checks a peer's certificate against the X509-SVID rules, the current bundle and the
    issuer's CRLs (``revocation``, always present: production has no "no revocation" mode).

    A chain that passed the X509-SVID rules is remembered by its exact DER bytes together with
    the bundle object it was verified against, and only while every certificate in it is within
    its validity: a new certificate, a new bundle (rotation of a CA) or the passing of time
    means a full verification. Revocation is never remembered: every call asks the CRLs.
    """

    CACHE_SIZE = 1024

    def __init__(
        self,
        bundle: Callable[[], SvidMaterial],
        trust_domain: str,
        *,
        revocation: RevocationChecker,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._material = bundle
        self.trust_domain = trust_domain
        self.revocation = revocation
        self._clock = clock
        self._lock = threading.Lock()
        self._verified: OrderedDict[
            tuple[bytes, ...], tuple[tuple[x509.Certificate, ...], _VerifiedChain]
        ] = OrderedDict()

    def _verified_chain(self, chain_der: list[bytes]) -> _VerifiedChain:
        bundle = self._material().bundle
        key = tuple(chain_der)
        now = self._clock()
        with self._lock:
            remembered = self._verified.get(key)
            if remembered is not None:
                self._verified.move_to_end(key)
        if remembered is not None:
            verified_against, verified = remembered
            if verified_against is bundle and verified.valid_from <= now < verified.valid_until:
                return verified
        spiffe_id = verify_der_chain(chain_der, bundle, trust_domain=self.trust_domain, now=now)
        chain = [load_der_certificates(der)[0] for der in chain_der]
        leaf = chain[0]
        verified = _VerifiedChain(
            spiffe_id=spiffe_id,
            leaf=leaf,
            serial=serial_hex(leaf),
            fingerprint_sha256=fingerprint_sha256(leaf),
            subject=leaf.subject.rfc4514_string(),
            valid_from=max(c.not_valid_before_utc for c in chain),
            valid_until=min(c.not_valid_after_utc for c in chain),
        )
        with self._lock:
            self._verified[key] = (bundle, verified)
            while len(self._verified) > self.CACHE_SIZE:
                self._verified.popitem(last=False)
        return verified

    def verify(self, chain_der: list[bytes], address: str) -> PeerIdentity:
        """Raise ``SvidVerificationError`` unless the chain is a valid SVID of our domain, and
        a ``RevocationError`` (with ``peer`` set) if it is revoked or its status is unknown."""
        verified = self._verified_chain(chain_der)
        peer = PeerIdentity(
            spiffe_id=verified.spiffe_id,
            serial=verified.serial,
            fingerprint_sha256=verified.fingerprint_sha256,
            address=address,
            subject=verified.subject,
            valid_until=verified.valid_until,
        )
        try:
            self.revocation.check(verified.leaf)
        except RevocationError as error:
            error.peer = peer
            raise
        return peer
