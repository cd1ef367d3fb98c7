"""Certificate revocation from the issuer's CRLs, enforced on every new and open connection.

ztbank polls rather than being pushed to: ``RevocationWatcher``, a ``Worker``, fetches
``GET <issuer>/crls`` (every current CRL of the issuer's signing CAs, concatenated PEM) every
``interval`` seconds in its daemon thread.  A poll is one small plain-HTTP GET of signed data, so
the transport needs no trust: each CRL counts only once its signature verifies against the CA in
the current trust bundle whose subject is the CRL's issuer.  A forged, corrupt or foreign CRL is
ignored and logged, and a CRL older than the one already held (a replay) is ignored too.

Fail closed: ``check`` refuses a leaf whose serial a CRL of its issuing CA lists, and also a leaf
whose issuing CA has no *fresh* CRL: one fetched and verified, ``now < nextUpdate``, and last
fetched less than its validity (``nextUpdate - thisUpdate``) ago.  While the issuer is
unreachable the last CRLs therefore keep serving until their ``nextUpdate``, after which new
connections are refused until a poll succeeds again; nothing needs restarting.

Listeners hear of every growth of the revoked set (in the watcher's thread) and close what is
already open: the gateway's live HTTPS connections, the gRPC servers' open streams.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.client import HTTPException
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from services.common.errors import CommonError
from services.common.files import ensure_private_dir, write_atomic
from services.common.identity.x509svid import issued_directly_by
from services.common.mtls.peer import PeerIdentity
from services.common.runtime.worker import Worker

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.5
DEFAULT_FETCH_TIMEOUT = 2.0
# All the CRLs of one issuer; anything bigger is not an answer from our issuer.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_SHA256 = hashes.SHA256()

RevocationListener = Callable[[frozenset[str]], None]
Clock = Callable[[], datetime]


class RevocationError(CommonError):
    """The peer is refused on account of revocation; ``peer`` is set once it is known."""

    peer: PeerIdentity | None = None


class RevokedCertificateError(RevocationError):
    """A CRL of the certificate's issuing CA lists its serial number."""


class RevocationUnavailableError(RevocationError):
    """No fresh CRL vouches for the certificate: refused (fail closed)."""


class RevocationChecker(Protocol):
    """What the TLS layers need from revocation: ``RevocationWatcher`` in production."""

    def check(self, leaf: x509.Certificate) -> None: ...

    def subscribe(self, listener: RevocationListener) -> None: ...

    def revoked_serials(self) -> frozenset[str]: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _ca_name(ca: x509.Certificate) -> str:
    return ca.subject.rfc4514_string()


@dataclass(frozen=True)
class _Revocation:
    date: datetime
    reason: str | None


@dataclass(frozen=True)
class _CaCrl:
    """The newest verified CRL of one CA, reduced to what ``check`` needs."""

    ca: x509.Certificate
    number: int
    this_update: datetime
    next_update: datetime
    fetched_at: datetime  # the last poll that returned this CRL (or an identical one)
    revoked: dict[int, _Revocation]
    # The CA's subject, DER-encoded once: ``check`` compares it with each leaf's issuer on
    # every call, and comparing parsed names cost more than the rest of the check.
    ca_subject: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ca_subject", self.ca.subject.public_bytes())

    @property
    def order(self) -> tuple[datetime, int]:
        return self.this_update, self.number

    def stale_reason(self, now: datetime) -> str | None:
        if now >= self.next_update:
            return f"its CRL expired at {self.next_update.isoformat()} (nextUpdate)"
        validity = self.next_update - self.this_update
        if now - self.fetched_at >= validity:
            return (
                f"its CRL was last fetched at {self.fetched_at.isoformat()}, "
                f"longer ago than its validity of {validity.total_seconds():g}s"
            )
        return None


def split_pem_crls(body: bytes) -> list[bytes]:
    """Each ``-----BEGIN X509 CRL-----`` block of a concatenated PEM body, in order."""
    return _PEM_CRL.findall(body)


def crl_reason(entry: x509.RevokedCertificate) -> str | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
    except (x509.ExtensionNotFound, ValueError):
        return None


def crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            return False
    except x509.ExtensionNotFound:
        pass
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False


@functools.lru_cache(maxsize=1024)
def _issuer_and_serial(leaf: x509.Certificate) -> tuple[bytes, int]:
    """A peer presents the same leaf on every call: decode these once."""
    return leaf.issuer.public_bytes(), leaf.serial_number


class RevocationWatcher(Worker):
    """Polls the issuer's CRLs and answers "may this certificate connect?".

    ``bundle`` returns the current trust bundle (the SVID source's): CRLs are verified against
    it on every poll, and a CA that leaves the bundle takes its CRL along.  ``clock`` returns
    the current aware UTC time and exists for tests.
    """

    def __init__(
        self,
        url: str,
        bundle: Callable[[], Sequence[x509.Certificate]],
        *,
        interval: float = DEFAULT_INTERVAL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        clock: Clock = _utcnow,
        cache: Path | None = None,
    ) -> None:
        """``cache``: a file that keeps the last answer that verified, read when the issuer
        cannot be reached, for short-lived clients that start during an outage (its CRLs are
        verified and judged fresh or stale like any fetched ones)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"CRL URL {url!r} must be http:// or https://")
        if interval <= 0:
            raise ValueError("the CRL polling interval must be positive")
        # close() waits for a poll in flight: its fetch gives up after ``fetch_timeout``.
        super().__init__("crl-watcher", join_timeout=fetch_timeout + interval)
        self.url = url
        self._poll_interval = interval
        self._bundle = bundle
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._cache = cache
        # CRLs are signed data: no proxy from the environment gets to see or answer the poll.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._lock = threading.Lock()
        self._crls: dict[bytes, _CaCrl] = {}  # by CA fingerprint (SHA-256)
        self._revoked: frozenset[str] = frozenset()
        self._listeners: list[RevocationListener] = []
        self._problems: frozenset[str] = frozenset()
        self._etag: str | None = None  # of the last answer, and its body
        self._body = b""
        self._ready = threading.Event()

    # -- lifecycle (start, close: the Worker's) -------------------------------------------

    def run_once(self) -> None:
        self.poll()

    def interval(self) -> float:
        return self._poll_interval

    def wait_ready(self, timeout: float) -> None:
        """Block until the revocation data is fresh; raise RevocationUnavailableError after
        ``timeout`` seconds, so that a service starting with the issuer away fails closed."""
        if not self._ready.wait(timeout):
            problems = "; ".join(sorted(self._problems)) or "no CRL verified"
            raise RevocationUnavailableError(
                f"no fresh CRL from {self.url} within {timeout:g}s: {problems}"
            )

    # -- polling ---------------------------------------------------------------------------

    def _fetch(self) -> bytes:
        """The body of ``/crls``; on 304 Not Modified (``If-None-Match``, the issuer's ETag
        saves sending it again), the body of the previous answer, verified again as if new."""
        request = urllib.request.Request(self.url)  # noqa: S310 (scheme checked in __init__)
        if self._etag is not None:
            request.add_header("If-None-Match", self._etag)
        try:
            with self._opener.open(request, timeout=self._fetch_timeout) as response:
                body: bytes = response.read(MAX_RESPONSE_BYTES + 1)
                etag = response.headers.get("ETag")
        except urllib.error.HTTPError as error:
            if error.code == HTTPStatus.NOT_MODIFIED and self._etag is not None:
                error.close()
                return self._body
            raise
        if len(body) > MAX_RESPONSE_BYTES:
            raise ValueError(f"response larger than {MAX_RESPONSE_BYTES} bytes")
        self._etag, self._body = etag, body
        return body

    def _cached(self) -> bytes | None:
        if self._cache is None:
            return None
        try:
            return self._cache.read_bytes()
        except OSError:
            return None

    def _keep(self, body: bytes) -> None:
        if self._cache is None:
            return
        try:
            ensure_private_dir(self._cache.parent)
            write_atomic(self._cache, body)
        except OSError as error:  # the cache only helps: never fail a verified poll over it
            logger.warning("revocation: cannot keep the CRLs in %s: %s", self._cache, error)

    def poll(self) -> None:
        """One fetch: verify every CRL, keep the newest per CA, notify if the set grew."""
        problems: list[str] = []
        fetched = True
        try:
            body = self._fetch()
        except (OSError, ValueError, HTTPException) as error:  # URLError is an OSError
            problems.append(f"cannot fetch {self.url}: {error}")
            cached = self._cached()
            if cached is None:
                self._report(problems)
                return
            body, fetched = cached, False
        now = self._clock()
        bundle = list(self._bundle())
        # A CA that left the bundle, or expired (nothing it issued verifies any more), takes its
        # CRL along: the issuer stops publishing it, and it must not hold the alert up forever.
        in_bundle = {ca.fingerprint(_SHA256) for ca in bundle if ca.not_valid_after_utc > now}
        received: dict[bytes, _CaCrl] = {}
        blocks = split_pem_crls(body)
        if not blocks:
            problems.append(f"{self.url} returned no PEM CRL")
        for index, block in enumerate(blocks):
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError as error:
                problems.append(f"CRL #{index} ignored: unparsable: {error}")
                continue
            parsed = self._verified(crl, bundle, now)
            if isinstance(parsed, str):
                problems.append(f"CRL #{index} ({crl.issuer.rfc4514_string()}) ignored: {parsed}")
                continue
            key = parsed.ca.fingerprint(_SHA256)
            if key not in in_bundle:
                continue  # the CRL of an expired CA
            if key not in received or parsed.order > received[key].order:
                received[key] = parsed
        with self._lock:
            crls = {key: crl for key, crl in self._crls.items() if key in in_bundle}
            for key, new in received.items():
                held = crls.get(key)
                if held is None or new.order > held.order:
                    crls[key] = new
                elif new.order == held.order:
                    crls[key] = _CaCrl(
                        held.ca, held.number, held.this_update, held.next_update, now, held.revoked
                    )
                else:
                    problems.append(
                        f"CRL {new.number} of {_ca_name(new.ca)} ignored: older than the "
                        f"CRL {held.number} already held (a replay?)"
                    )
            self._crls = crls
            before = self._revoked
            self._revoked = frozenset(
                format(serial, "x") for crl in crls.values() for serial in crl.revoked
            )
            revoked = self._revoked
            listeners = list(self._listeners)
        if self.fresh():
            self._ready.set()
            if fetched and not problems and self._cache is not None:
                self._keep(body)
        self._report(problems)
        if revoked - before:
            logger.warning("revoked certificates: %s", ", ".join(sorted(revoked - before)))
            for listener in listeners:
                try:
                    listener(revoked)
                except Exception:
                    logger.exception("revocation listener failed")

    def _verified(
        self, crl: x509.CertificateRevocationList, bundle: list[x509.Certificate], now: datetime
    ) -> _CaCrl | str:
        """The CRL reduced to ``_CaCrl``, or why it cannot be used."""
        candidates = [ca for ca in bundle if ca.subject == crl.issuer]
        if not candidates:
            return "its issuer is not a CA of the trust bundle"
        signer = next((ca for ca in candidates if crl_signed_by(crl, ca)), None)
        if signer is None:
            return "signature does not verify against the CA of that name in the bundle"
        next_update = crl.next_update_utc
        if next_update is None:
            return "no nextUpdate"
        if next_update <= crl.last_update_utc:
            return "nextUpdate is not after thisUpdate"
        try:
            crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
            return "delta CRLs are not supported"
        except x509.ExtensionNotFound:
            pass
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = 0
        return _CaCrl(
            ca=signer,
            number=number,
            this_update=crl.last_update_utc,
            next_update=next_update,
            fetched_at=now,
            revoked={
                entry.serial_number: _Revocation(entry.revocation_date_utc, crl_reason(entry))
                for entry in crl
            },
        )

    def _report(self, problems: list[str]) -> None:
        """Log each problem when it appears and once when all are gone: a poll every half
        second must not flood the log during an outage."""
        current = frozenset(problems)
        with self._lock:
            previous, self._problems = self._problems, current
        for problem in sorted(current - previous):
            logger.warning("revocation: %s", problem)
        if previous and not current:
            logger.info("revocation: CRLs from %s verified again", self.url)

    # -- queries ---------------------------------------------------------------------------

    def check(self, leaf: x509.Certificate) -> None:
        """Raise RevokedCertificateError if ``leaf`` is revoked, RevocationUnavailableError if
        no fresh CRL of its issuing CA says it is not."""
        now = self._clock()
        issuer, serial_number = _issuer_and_serial(leaf)
        with self._lock:
            candidates = [crl for crl in self._crls.values() if crl.ca_subject == issuer]
        if len(candidates) > 1:
            candidates = [crl for crl in candidates if issued_directly_by(leaf, crl.ca)]
        if not candidates:
            raise RevocationUnavailableError(
                f"revocation status unavailable: no CRL of the issuing CA "
                f"{leaf.issuer.rfc4514_string()} for serial {serial_number:x}"
            )
        crl = candidates[0]
        revocation = crl.revoked.get(serial_number)
        if revocation is not None:
            reason = f", reason {revocation.reason}" if revocation.reason else ""
            raise RevokedCertificateError(
                f"certificate revoked: serial {serial_number:x} revoked at "
                f"{revocation.date.isoformat()} by {_ca_name(crl.ca)}{reason}"
            )
        stale = crl.stale_reason(now)
        if stale is not None:
            raise RevocationUnavailableError(
                f"revocation status unavailable: no fresh CRL of {_ca_name(crl.ca)}: {stale}"
            )

    def subscribe(self, listener: RevocationListener) -> None:
        """``listener(revoked_serials)`` runs in the watcher thread whenever the set grows."""
        with self._lock:
            self._listeners.append(listener)

    def revoked_serials(self) -> frozenset[str]:
        """Every serial (lowercase hex) the held CRLs list."""
        with self._lock:
            return self._revoked

    def fresh(self) -> bool:
        """True while at least one CRL is held and every held CRL is fresh: the alert."""
        now = self._clock()
        with self._lock:
            crls = list(self._crls.values())
        return bool(crls) and all(crl.stale_reason(now) is None for crl in crls)

    def problem(self) -> str | None:
        """Why peers are refused for want of revocation data now (readiness), None when every
        held CRL is fresh."""
        now = self._clock()
        with self._lock:
            crls = list(self._crls.values())
        if not crls:
            return f"failing closed: no CRL verified yet from {self.url}"
        for crl in crls:
            stale = crl.stale_reason(now)
            if stale is not None:
                return f"failing closed: no fresh CRL of {_ca_name(crl.ca)}: {stale}"
        return None

    def age_seconds(self) -> float | None:
        """Seconds since the stalest held CRL was last fetched; None before the first one."""
        now = self._clock()
        with self._lock:
            fetched = [crl.fetched_at for crl in self._crls.values()]
        if not fetched:
            return None
        return (now - min(fetched)).total_seconds()
