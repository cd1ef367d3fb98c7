"""What a breaker knows of its peer: the certificate the peer served at its last verified
handshake, kept fresh by a ``PeerWatch`` thread.

A grpcio client cannot see the certificate the server presented on the channel's own handshake,
so ``PeerWatch`` makes its own short TLS handshake to the target (as ``ztbank status`` does),
verifies the served X509-SVID like a server verifies its callers (chain, rules, revocation,
expected SPIFFE ID), and keeps what it saw.  It handshakes again once the seen certificate is
past the point where the peer should have rotated it.  The breaker only reads the result
(``PeerView``), so tests give it a fake peer and no network.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import CommonError
from services.common.identity.pem import load_der_certificates, serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier, client_context
from services.common.runtime.worker import Worker

logger = logging.getLogger(__name__)

# While no certificate of the peer has been seen, the watcher retries this often.
FIRST_PROBE_RETRY_SECONDS = 0.25
# Between handshakes while waiting for the peer's next certificate: a fiftieth of its lifetime
# (0.4 s for 20 s SVIDs), within these bounds.
PROBE_INTERVAL_BOUNDS = (0.1, 2.0)
PROBE_TIMEOUT_SECONDS = 2.0
# The watcher handshakes again once the seen certificate has less than this fraction of its
# lifetime left: ztbank workloads rotate between 40 % and 50 % of it (issuer ROTATE_FROM/TO).
REFRESH_FRACTION = 0.6


@dataclass(frozen=True)
class PeerCertificate:
    """What the peer served at its last verified handshake (times in seconds since the epoch)."""

    spiffe_id: SpiffeId
    serial: str
    not_before: float
    not_after: float

    def lifetime_left(self, now: float) -> float:
        lifetime = self.not_after - self.not_before
        if lifetime <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.not_after - now) / lifetime))


class PeerView(Protocol):
    """The latest verified certificate of the peer, or None with the reason."""

    @property
    def certificate(self) -> PeerCertificate | None: ...

    @property
    def problem(self) -> str: ...

    def wake(self) -> None:
        """Look at the peer again soon (a call found no certificate)."""

    def close(self) -> None:
        """Stop looking at the peer: its breaker is done."""


class PeerWatch(Worker):
    """Handshakes with the target in a thread of its own and keeps the verified certificate.

    A target that cannot be reached keeps its last certificate (which ages: its lifetime left
    falls and the score with it); one that serves a certificate failing verification (revoked,
    another SPIFFE ID, not an X509-SVID of our domain) loses it at once.
    """

    def __init__(
        self,
        *,
        target: Callable[[], str],
        material: Callable[[], SvidMaterial],
        verifier: PeerVerifier,
        expected: SpiffeId,
    ) -> None:
        super().__init__(f"peer-watch-{expected}")
        self._target = target
        self._material = material
        self._verifier = verifier
        self._expected = expected
        self.certificate: PeerCertificate | None = None
        self.problem = f"no verified handshake with {expected} yet"
        self._context: tuple[str, ssl.SSLContext] | None = None

    def run_once(self) -> None:
        self.look()

    def interval(self) -> float:
        seen = self.certificate
        if seen is None:
            return FIRST_PROBE_RETRY_SECONDS
        lifetime = seen.not_after - seen.not_before
        refresh_at = seen.not_after - REFRESH_FRACTION * lifetime
        low, high = PROBE_INTERVAL_BOUNDS
        return max(refresh_at - time.time(), min(high, max(low, lifetime / 50)))

    def look(self) -> None:
        """One handshake; updates ``certificate`` and ``problem``."""
        target = self._target()
        try:
            der = self._handshake(target)
            peer = self._verifier.verify([der], target)
            if peer.spiffe_id != self._expected:
                raise CommonError(f"it is {peer.spiffe_id}, expected {self._expected}")
        except (ssl.SSLCertVerificationError, CommonError) as error:
            self._lose(f"{target} served a certificate that failed verification: {error}")
            return
        except OSError as error:
            # Unreachable: the last certificate stays and ages (see the class docstring).
            if self.certificate is None:
                self.problem = f"no verified handshake with {self._expected} yet: {error}"
            return
        seen = self.certificate
        if seen is None or seen.serial != peer.serial:
            leaf = load_der_certificates(der)[0]
            self.certificate = PeerCertificate(
                spiffe_id=peer.spiffe_id,
                serial=serial_hex(leaf),
                not_before=leaf.not_valid_before_utc.timestamp(),
                not_after=leaf.not_valid_after_utc.timestamp(),
            )

    def _lose(self, problem: str) -> None:
        if self.certificate is not None or problem != self.problem:
            logger.warning("peer %s: %s", self._expected, problem)
        self.certificate = None
        self.problem = problem

    def _handshake(self, target: str) -> bytes:
        material = self._material()
        if self._context is None or self._context[0] != material.serial:
            self._context = (material.serial, client_context(material, ["h2"]))
        host, _, port = target.rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_SECONDS) as raw,
            self._context[1].wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        if der is None:
            raise ssl.SSLError("the server sent no certificate")
        return der
