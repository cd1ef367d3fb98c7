"""``MtlsChannel``'s discovery watcher: it looks again one interval after the channel's own
lookup, follows a move, and ``aclose()`` joins it without blocking the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.grpc import MtlsChannel
from tests.support.crl import wait_for
from tests.support.mtls_servers import FakeSource
from tests.support.pki import create_intermediate_ca, create_leaf, create_root_ca

ENGINE = "spiffe://ztbank.example/env/test/zone/az1/team/payments/svc/transfer-engine"
WATCHER = "discovery-risk"


@pytest.fixture(scope="module")
def source() -> FakeSource:
    root = create_root_ca()
    ca = create_intermediate_ca(root)
    leaf = create_leaf(ca, uri_sans=[ENGINE])
    return FakeSource(
        SvidMaterial(
            spiffe_id=SpiffeId.parse(ENGINE),
            chain=(leaf.certificate, ca.certificate),
            key=leaf.key,
            bundle=(root.certificate, ca.certificate),
        )
    )


def watcher_threads() -> int:
    return sum(thread.name == WATCHER for thread in threading.enumerate())


class Registry:
    """Answers where "risk" is and counts the lookups."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.lookups = 0

    def resolve(self) -> str:
        self.lookups += 1
        return self.target


def test_the_watcher_looks_again_after_an_interval_and_follows_a_move(
    source: FakeSource,
) -> None:
    registry = Registry("127.0.0.1:1")
    channel = MtlsChannel(source, registry.resolve, "risk", recheck_seconds=0.2)
    try:
        time.sleep(0.05)
        assert registry.lookups == 1  # the channel's own; the watcher's comes an interval later
        registry.target = "127.0.0.1:2"
        assert wait_for(lambda: channel.target == "127.0.0.1:2")
    finally:
        asyncio.run(channel.aclose())


def test_aclose_joins_the_watcher(source: FakeSource) -> None:
    before = watcher_threads()
    channel = MtlsChannel(source, Registry("127.0.0.1:1").resolve, "risk", recheck_seconds=60)
    assert watcher_threads() == before + 1
    asyncio.run(channel.aclose())
    assert watcher_threads() == before
    asyncio.run(channel.aclose())  # idempotent


def test_aclose_waits_for_a_lookup_in_flight_off_the_event_loop(source: FakeSource) -> None:
    in_lookup, release = threading.Event(), threading.Event()
    registry = Registry("127.0.0.1:1")

    def slow_resolve() -> str:
        if registry.lookups:  # the watcher's lookups, not the channel's own first one
            in_lookup.set()
            release.wait(5)
        return registry.resolve()

    before = watcher_threads()
    channel = MtlsChannel(source, slow_resolve, "risk", recheck_seconds=0.01)
    assert in_lookup.wait(5)

    async def scenario() -> None:
        closing = asyncio.ensure_future(channel.aclose())
        await asyncio.sleep(0.05)  # the loop goes on while aclose() waits for the lookup
        assert not closing.done()
        release.set()
        await closing

    asyncio.run(scenario())
    assert watcher_threads() == before
