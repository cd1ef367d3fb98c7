"""The registries that end what is already open when a peer is revoked: the gateway's live
connections and the gRPC servers' live streams (with their pump threads), without sockets."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.common.audit import AuditLog
from services.common.grpc_mtls import _LiveStreams, _RevocableStream, _StreamRevokedError
from services.common.https_mtls import (
    CONNECTION_METHOD,
    REVOKED_CONNECTION_REASON,
    ConnectionFacts,
    HttpsGuard,
    LiveConnections,
)
from services.common.identity.spiffe_id import SpiffeId
from services.common.peer import PeerIdentity
from services.common.policy import Policy
from services.common.revocation import RevocationListener
from services.common.telemetry import Telemetry, setup_telemetry
from services.common.tls import PeerVerifier

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


def test_pump_passes_items_in_order_and_ends() -> None:
    stream = _RevocableStream("a1")
    assert list(stream.run(lambda: iter(range(5)))) == [0, 1, 2, 3, 4]


def test_pump_reraises_the_servicer_error_in_the_handler_thread() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise LookupError("boom")

    items: list[int] = []
    with pytest.raises(LookupError, match="boom"):
        items.extend(_RevocableStream("a1").run(failing))
    assert items == [1]


def test_pump_runs_the_servicer_in_the_callers_context() -> None:
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    variable.set("teller")
    seen: list[str] = []

    def servicer() -> Iterator[int]:
        seen.append(variable.get())
        yield 1

    assert list(_RevocableStream("a1").run(servicer)) == [1]
    assert seen == ["teller"]


def test_revocation_interrupts_a_servicer_blocked_between_items() -> None:
    release = threading.Event()
    closed = threading.Event()

    def blocked() -> Iterator[int]:
        try:
            yield 1
            release.wait(10)  # an idle stream: no item to check at
            yield 2
        finally:
            closed.set()

    stream = _RevocableStream("a1")
    items = stream.run(blocked)
    assert next(items) == 1
    threading.Timer(0.05, stream.revoke).start()
    with pytest.raises(_StreamRevokedError):
        next(items)
    release.set()  # the servicer wakes up: its generator is closed, the pump ends
    assert closed.wait(5)


def test_the_consumer_going_away_stops_the_pump() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            count = 0
            while True:
                yield count
                count += 1
        finally:
            closed.set()

    items = _RevocableStream("a1").run(endless)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # what grpc's handler does when the call ends
    assert closed.wait(5)


def test_live_streams_end_the_revoked_peers_streams_only() -> None:
    revocations = Revocations()
    streams = _LiveStreams(revocations)
    revoked, kept = streams.open("a1"), streams.open("b2")
    assert len(streams) == 2
    revocations.revoke("a1")
    with pytest.raises(_StreamRevokedError):
        next(revoked.run(lambda: iter(())))  # the notice is queued before the end
    assert next(kept.run(lambda: iter([7]))) == 7
    streams.close(revoked)
    streams.close(kept)
    assert len(streams) == 0


def test_a_stream_opened_after_the_notice_is_revoked_at_once() -> None:
    # The call was checked before the CRL arrived, registered after its notice went out.
    revocations = Revocations()
    streams = _LiveStreams(revocations)
    revocations.revoke("a1")
    stream = streams.open("a1")
    with pytest.raises(_StreamRevokedError):
        next(stream.run(lambda: iter([1])))


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


FACTS = ConnectionFacts(("127.0.0.1", 5000), ("127.0.0.1", 8443), "TLSv1.3", "TLS_AES_256_GCM")


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
