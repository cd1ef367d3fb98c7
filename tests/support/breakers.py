"""Circuit breakers for adapter tests: one that lets calls through, one that is open."""

from __future__ import annotations

import time

from services.common.identity.spiffe_id import SpiffeId
from services.common.resilience.circuit import CircuitBreaker
from services.common.resilience.peer_watch import PeerCertificate
from services.common.resilience.settings import BreakerConfig
from services.common.resilience.trust_table import TrustLevels

DAY = 86_400.0
PROD = TrustLevels(0.5, ((("env", "prod"), 0.95),), 1)


class FreshPeer:
    """A peer whose verified certificate was issued just now and lives a day."""

    def __init__(self, target: str) -> None:
        now = time.time()
        spiffe_id = SpiffeId.for_workload(
            "ztbank.example", env="prod", zone="az1", team="tests", service=target
        )
        self.certificate: PeerCertificate | None = PeerCertificate(spiffe_id, "01", now, now + DAY)
        self.problem = ""

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def closed_breaker(target: str, config: BreakerConfig | None = None) -> CircuitBreaker:
    """A breaker to a fresh prod peer: closed from the start, its window empty."""
    return CircuitBreaker(
        target, config or BreakerConfig(), levels=lambda: PROD, peer=FreshPeer(target)
    )


def open_breaker(target: str) -> CircuitBreaker:
    """A breaker whose peer was never verified: it refuses every call."""
    peer = FreshPeer(target)
    peer.certificate = None
    peer.problem = f"no verified handshake with {target} yet"
    return CircuitBreaker(target, BreakerConfig(), levels=lambda: PROD, peer=peer)
