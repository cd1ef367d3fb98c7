"""The gRPC trailing metadata callers and callees exchange about outages: which dependency an
UNAVAILABLE is about, and how long to wait before a retry.

A callee (the transfer-engine's server) writes them and a caller (its breaker, the gateway's
adapter) reads them, so they live apart from both: neither side imports the other for them.
"""

from __future__ import annotations

import grpc

# Set by a callee on an UNAVAILABLE about one of its own dependencies (the engine when risk is
# unavailable, value "risk"): the callee itself answered, so its callers' breakers count an
# answer, and a risk outage does not also cut the gateway's reads from the engine.
DEPENDENCY_UNAVAILABLE_KEY = "ztbank-dependency-unavailable"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def pushback_trailer(seconds: int) -> tuple[str, str]:
    """The trailer that tells a caller how long to wait before it retries: gRPC's own server
    pushback (gRFC A6), which a grpc retry policy would also honour."""
    return (RETRY_PUSHBACK_KEY, str(seconds * 1000))


def retry_pushback_seconds(error: grpc.aio.AioRpcError) -> int | None:
    """The callee's pushback in whole seconds (rounded up), if it sent a valid one."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                milliseconds = int(str(value))
            except ValueError:
                return None
            return -(-milliseconds // 1000) if milliseconds >= 0 else None
    return None


def unavailable_dependency(error: grpc.aio.AioRpcError) -> str | None:
    """The callee's dependency that an UNAVAILABLE is about, if the callee said so."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == DEPENDENCY_UNAVAILABLE_KEY:
            return str(value)
    return None
