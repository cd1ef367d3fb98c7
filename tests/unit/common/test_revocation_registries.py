"""The registries that end what is already open when a peer is revoked: the gateway's live
connections and the gRPC servers' live streams, without sockets."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.common.authz.audit import AuditLog
from services.common.authz.decisions import ConnectionFacts, TlsFacts
from services.common.authz.policy import Policy
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier
from services.common.mtls.grpc import _LiveStreams, _produce
from services.common.mtls.https import (
    CONNECTION_METHOD,
    REVOKED_CONNECTION_REASON,
    HttpsGuard,
    LiveConnections,
)
from services.common.mtls.peer import PeerIdentity
from services.common.observability.telemetry import Telemetry, setup_telemetry
from services.common.revocation import RevocationListener

TD = "ztbank.example"
TELLER = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/teller"


class Revocations:
    """A RevocationChecker double: the revoked set is whatever the test says."""

    def __init__(self) -> None:
        self.revoked: frozenset[str] = frozenset()
        self.listeners: list[RevocationListener] = []

    def check(self, leaf: x509.Certificate) -> None:
        pass

    def subscribe(self, listener: RevocationListener) -> None:
        self.listeners.append(listener)

    def revoked_serials(self) -> frozenset[str]:
        return self.revoked

    def revoke(self, *serials: str) -> None:
        self.revoked |= set(serials)
        for listener in self.listeners:
            listener(self.revoked)


def peer(serial: str) -> PeerIdentity:
    return PeerIdentity(SpiffeId.parse(TELLER), serial, "00" * 32, "127.0.0.1:5000")


# -- gRPC streams ----------------------------------------------------------------------------


class FakeStreamContext:
    """What ``_produce`` writes to: grpc.aio's ``context.write``."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.blocked = asyncio.Event()

    async def write(self, item: int) -> None:
        self.written.append(item)
        if item == 2:
            self.blocked.set()
            await asyncio.Event().wait()  # a slow client: the write waits for flow control


def produce(result: Any, context: FakeStreamContext) -> None:
    asyncio.run(_produce(result, context))  # type: ignore[arg-type]


def test_produce_writes_items_of_async_and_plain_iterators_in_order() -> None:
    async def numbers() -> AsyncIterator[int]:
        for number in (0, 1):
            yield number

    context = FakeStreamContext()
    produce(numbers(), context)
    produce(iter([5, 6]), context)
    assert context.written == [0, 1, 5, 6]


def test_produce_awaits_a_servicer_that_writes_for_itself() -> None:
    context = FakeStreamContext()

    async def writer() -> None:
        await context.write(7)

    produce(writer(), context)
    assert context.written == [7]


def test_produce_reraises_the_servicer_error() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise LookupError("boom")

    context = FakeStreamContext()
    with pytest.raises(LookupError, match="boom"):
        produce(failing(), context)
    assert context.written == [1]


def test_a_cancelled_stream_closes_its_servicer_even_during_a_write() -> None:
    closed: list[bool] = []

    async def endless() -> AsyncIterator[int]:
        try:
            count = 0
            while True:
                yield count
                count += 1
        finally:
            closed.append(True)

    async def scenario(context: FakeStreamContext) -> None:
        task = asyncio.ensure_future(_produce(endless(), context))  # type: ignore[arg-type]
        await asyncio.wait_for(context.blocked.wait(), 5)
        task.cancel()  # the call ended while the third write waited
        with pytest.raises(asyncio.CancelledError):
            await task

    context = FakeStreamContext()
    asyncio.run(scenario(context))
    assert context.written == [0, 1, 2]
    assert closed == [True]


def test_live_streams_end_the_revoked_peers_streams_only() -> None:
    revocations = Revocations()
    streams = _LiveStreams(revocations)

    async def scenario() -> None:
        revoked, kept = streams.open("a1"), streams.open("b2")
        assert len(streams) == 2
        # The notice comes from the revocation watcher's thread.
        notifier = threading.Thread(target=revocations.revoke, args=("a1",))
        notifier.start()
        await asyncio.wait_for(revoked.revoked.wait(), 5)
        notifier.join()
        await asyncio.sleep(0.05)
        assert not kept.revoked.is_set()
        streams.close(revoked)
        streams.close(kept)
        assert len(streams) == 0

    asyncio.run(scenario())


def test_a_stream_opened_after_the_notice_is_revoked_at_once() -> None:
    # The call was checked before the CRL arrived, registered after its notice went out.
    revocations = Revocations()
    streams = _LiveStreams(revocations)
    revocations.revoke("a1")

    async def scenario() -> None:
        stream = streams.open("a1")
        await asyncio.wait_for(stream.revoked.wait(), 5)

    asyncio.run(scenario())


# -- HTTPS connections -----------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


@pytest.fixture
def telemetry(tmp_path: Path) -> Iterator[Telemetry]:
    instance = setup_telemetry("unit", metrics_port=None, spans_path=tmp_path / "spans.jsonl")
    yield instance
    instance.shutdown()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)
    yield log
    log.close()


@pytest.fixture
def revocations() -> Revocations:
    return Revocations()


@pytest.fixture
def guard(
    tmp_path: Path, audit: AuditLog, telemetry: Telemetry, revocations: Revocations
) -> HttpsGuard:
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(json.dumps({"rules": []}))
    return HttpsGuard(
        service="gateway",
        verifier=PeerVerifier(_no_material, TD, revocation=revocations),
        policy=Policy(policy_path, TD),
        audit=audit,
        telemetry=telemetry,
    )


def _no_material() -> Any:
    raise AssertionError("not used")


FACTS = ConnectionFacts(
    ("127.0.0.1", 5000),
    ("127.0.0.1", 8443),
    TlsFacts(version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", session_id="5e55"),
)


def records(audit: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit.path.read_text().splitlines()]


def test_live_connections_abort_the_revoked_peer_in_its_loop(
    guard: HttpsGuard, revocations: Revocations, audit: AuditLog
) -> None:
    live = LiveConnections(guard)
    revocations.subscribe(live.close_revoked)
    revoked, kept = FakeTransport(), FakeTransport()

    async def scenario() -> None:
        assert live.add("c1", revoked, peer("a1"), FACTS)  # type: ignore[arg-type]
        assert live.add("c2", kept, peer("b2"), FACTS)  # type: ignore[arg-type]
        notice = threading.Thread(target=revocations.revoke, args=("a1",))
        notice.start()  # from another thread, as the watcher does
        notice.join()
        await asyncio.sleep(0.01)  # the abort is handed to the loop
        revocations.revoke("a1")  # a repeated notice closes nothing twice
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert (revoked.aborted, kept.aborted) == (1, 0)
    assert len(live) == 1
    [record] = records(audit)
    assert (record["decision"], record["method"]) == ("deny", CONNECTION_METHOD)
    assert (record["reason"], record["cert_serial"]) == (REVOKED_CONNECTION_REASON, "a1")
    assert record["caller_spiffe_id"] == TELLER
    assert (record["tls_version"], record["source_port"]) == ("TLSv1.3", 5000)


def test_a_connection_registered_after_the_notice_is_closed_at_once(
    guard: HttpsGuard, revocations: Revocations, audit: AuditLog
) -> None:
    live = LiveConnections(guard)
    revocations.revoke("a1")
    transport = FakeTransport()

    async def scenario() -> bool:
        return live.add("c1", transport, peer("a1"), FACTS)  # type: ignore[arg-type]

    assert asyncio.run(scenario()) is False
    assert transport.aborted == 1
    assert len(live) == 0
    assert records(audit)[0]["reason"] == REVOKED_CONNECTION_REASON


def test_a_discarded_connection_is_not_aborted(
    guard: HttpsGuard, revocations: Revocations, audit: AuditLog
) -> None:
    live = LiveConnections(guard)
    revocations.subscribe(live.close_revoked)
    transport = FakeTransport()

    async def scenario() -> None:
        live.add("c1", transport, peer("a1"), FACTS)  # type: ignore[arg-type]
        live.discard("c1")  # connection_lost
        revocations.revoke("a1")
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert transport.aborted == 0
    assert not audit.path.read_text()
