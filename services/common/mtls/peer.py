"""The verified identity of the peer of the current request, set by the mTLS layer.

Transports (the gRPC interceptor, the HTTPS protocol) verify the peer's X509-SVID on every
connection and put the result here before any handler runs; handlers read it with
``current_peer()`` and never look at certificates themselves.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import CommonError
from services.common.identity.spiffe_id import SpiffeId


class NoPeerIdentityError(CommonError):
    """A handler ran without a verified peer: a wiring bug, so fail closed."""


@dataclass(frozen=True)
class PeerIdentity:
    spiffe_id: SpiffeId
    serial: str  # lowercase hex
    fingerprint_sha256: str  # lowercase hex
    address: str  # "host:port" of the peer, for audit
    subject: str | None = None  # the certificate's subject DN (RFC 4514), for audit
    # The end of the chain's validity (the earliest notAfter): connections end there.
    valid_until: datetime | None = None


_CURRENT: ContextVar[PeerIdentity | None] = ContextVar("ztbank_peer", default=None)


def current_peer() -> PeerIdentity:
    peer = _CURRENT.get()
    if peer is None:
        raise NoPeerIdentityError("no verified peer identity for this request")
    return peer


def set_current_peer(peer: PeerIdentity | None) -> object:
    """Returns a token for ``reset_current_peer``."""
    return _CURRENT.set(peer)


def reset_current_peer(token: object) -> None:
    _CURRENT.reset(token)  # type: ignore[arg-type]
