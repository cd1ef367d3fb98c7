"""A calling service's breaker to one callee, wired: its peer watch looked once and started,
its metrics registered.  The one place that puts the breaker's parts together, so the runtime
asks for a breaker by callee and the parts stay independent of each other.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry.metrics import Meter

from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier
from services.common.resilience.circuit import CircuitBreaker
from services.common.resilience.metrics import register_breaker_metrics
from services.common.resilience.peer_watch import PeerWatch
from services.common.resilience.settings import BreakerConfig
from services.common.resilience.trust_table import TrustTable


def watched_breaker(
    target: str,
    expected: SpiffeId,
    *,
    address: Callable[[], str],
    material: Callable[[], SvidMaterial],
    verifier: PeerVerifier,
    table: TrustTable,
    config: BreakerConfig,
    meter: Meter,
) -> CircuitBreaker:
    """The breaker of calls to ``target`` (expected to be ``expected``, found at ``address()``)
    with its metrics and its peer watch, started; closing the breaker stops the watch."""
    watch = PeerWatch(target=address, material=material, verifier=verifier, expected=expected)
    # One look before the service serves: callees start first (risk, the engine, then the
    # gateway), so the first calls have a score.  An unreachable callee is looked at again by
    # the thread.
    watch.look()
    watch.start()
    breaker = CircuitBreaker(target, config, levels=table.current, peer=watch)
    register_breaker_metrics(meter, [breaker])
    return breaker
