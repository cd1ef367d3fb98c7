import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from services._proto import risk_pb2, risk_pb2_grpc
from services.common.errors import ChannelClosedError
from services.common.resilience.circuit import BreakerState
from services.common.resilience.settings import BreakerConfig
from services.common.risk_decision import RiskDecision as Decision
from services.transfer_engine.adapters.risk_client import GrpcRiskAssessor
from services.transfer_engine.domain.model import Assessment
from services.transfer_engine.errors import RiskUnavailableError
from tests.support.breakers import closed_breaker, open_breaker
from tests.unit.transfer_engine.support import transfer_request

TIMEOUT_SECONDS = 0.2


class ScriptedRisk(risk_pb2_grpc.RiskServicer):
    def __init__(self, decision: str) -> None:
        self.decision = decision
        self.abort_with: grpc.StatusCode | None = None
        self.abort_details = "scripted failure"
        self.abort_trailers: tuple[tuple[str, str], ...] = ()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.stall = False
        self.requests: list[risk_pb2.AssessRequest] = []

    def Assess(
        self, request: risk_pb2.AssessRequest, context: grpc.ServicerContext
    ) -> risk_pb2.Assessment:
        self.requests.append(request)
        if self.abort_with is not None:
            if self.abort_trailers:
                context.set_trailing_metadata(self.abort_trailers)
            context.abort(self.abort_with, self.abort_details)
        if self.stall:
            self.stalled.set()
            self.release.wait(5)
        return risk_pb2.Assessment(decision=self.decision, reasons=["velocity"], score=42)


class RiskServer:
    """A real risk server (blocking grpcio, in its own threads) for the grpc.aio client."""

    def __init__(self, decision: str = "allow") -> None:
        self.risk = ScriptedRisk(decision)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        risk_pb2_grpc.add_RiskServicer_to_server(self.risk, self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.risk.release.set()
        self._server.stop(grace=None)


@pytest.fixture
def server() -> Iterator[RiskServer]:
    server = RiskServer()
    yield server
    server.stop()


def assess(server: RiskServer, transfer_id: str = "tr-1") -> Assessment:
    """One assessment over a fresh grpc.aio channel, on an event loop of its own."""

    async def run() -> Assessment:
        async with grpc.aio.insecure_channel(server.target) as channel:
            assessor = GrpcRiskAssessor(
                lambda: channel, timeout_seconds=TIMEOUT_SECONDS, breaker=closed_breaker("risk")
            )
            return await assessor.assess(transfer_request(), transfer_id=transfer_id)

    return asyncio.run(run())


@pytest.mark.parametrize("decision", list(Decision))
def test_answers_become_assessments(server: RiskServer, decision: Decision) -> None:
    server.risk.decision = decision.value
    assessment = assess(server)
    assert assessment == Assessment(decision, ("velocity",), 42)
    [sent] = server.risk.requests
    assert sent == risk_pb2.AssessRequest(
        transfer_id="tr-1",
        customer="alice",
        from_account="acc-alice-cny",
        to_account="acc-bob-cny",
        amount_minor=12_345,
        currency="CNY",
    )


def test_the_current_channel_is_used_for_every_assessment(server: RiskServer) -> None:
    replacement = RiskServer("deny")

    async def run() -> tuple[Decision, Decision]:
        async with (
            grpc.aio.insecure_channel(server.target) as first,
            grpc.aio.insecure_channel(replacement.target) as second,
        ):
            current = [first]
            assessor = GrpcRiskAssessor(
                lambda: current[0], timeout_seconds=TIMEOUT_SECONDS, breaker=closed_breaker("risk")
            )
            before = await assessor.assess(transfer_request(), transfer_id="tr-1")
            current[0] = second  # what a certificate rotation does
            after = await assessor.assess(transfer_request(), transfer_id="tr-2")
            return before.decision, after.decision

    try:
        assert asyncio.run(run()) == (Decision.ALLOW, Decision.DENY)
    finally:
        replacement.stop()
    assert [r.transfer_id for r in server.risk.requests] == ["tr-1"]
    assert [r.transfer_id for r in replacement.risk.requests] == ["tr-2"]


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED],
)
def test_errors_fail_closed(
    server: RiskServer, code: grpc.StatusCode, caplog: pytest.LogCaptureFixture
) -> None:
    server.risk.abort_with = code
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(RiskUnavailableError, match=r"^risk service unavailable$"),
    ):
        assess(server)
    # The operator learns why: the status and its details are logged, not sent on.
    assert f"risk assessment of tr-1 failed: {code} scripted failure" in caplog.messages


def test_a_slow_answer_fails_closed(server: RiskServer) -> None:
    server.risk.stall = True
    with pytest.raises(RiskUnavailableError) as caught:
        assess(server)
    assert server.risk.stalled.is_set()
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
    assert caught.value.__cause__.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_unknown_decision_fails_closed(server: RiskServer) -> None:
    server.risk.decision = "maybe"
    with pytest.raises(RiskUnavailableError):
        assess(server)


def test_a_channel_closed_by_rotation_fails_closed(server: RiskServer) -> None:
    async def run() -> Assessment:
        channel = grpc.aio.insecure_channel(server.target)
        await channel.close()  # retired by a rotation after the assessor fetched it
        assessor = GrpcRiskAssessor(
            lambda: channel, timeout_seconds=TIMEOUT_SECONDS, breaker=closed_breaker("risk")
        )
        return await assessor.assess(transfer_request(), transfer_id="tr-1")

    with pytest.raises(RiskUnavailableError) as caught:
        asyncio.run(run())
    assert isinstance(caught.value.__cause__, grpc.aio.UsageError)
    assert server.risk.requests == []


def test_a_channel_closed_by_shutdown_fails_closed() -> None:
    def closed() -> grpc.aio.Channel:
        raise ChannelClosedError("the channel to risk is closed")  # AioMtlsChannel after aclose

    assessor = GrpcRiskAssessor(
        closed, timeout_seconds=TIMEOUT_SECONDS, breaker=closed_breaker("risk")
    )
    with pytest.raises(RiskUnavailableError, match=r"^risk service unavailable$"):
        asyncio.run(assessor.assess(transfer_request(), transfer_id="tr-1"))


def test_an_open_breaker_fails_closed_without_asking_risk(server: RiskServer) -> None:
    async def run() -> Assessment:
        async with grpc.aio.insecure_channel(server.target) as channel:
            assessor = GrpcRiskAssessor(
                lambda: channel, timeout_seconds=TIMEOUT_SECONDS, breaker=open_breaker("risk")
            )
            return await assessor.assess(transfer_request(), transfer_id="tr-1")

    with pytest.raises(RiskUnavailableError) as refused:
        asyncio.run(run())
    assert str(refused.value) == (
        "risk service unavailable: the circuit breaker to it is open; retry in 1 s"
    )
    assert refused.value.retry_after_seconds == 1  # relayed to the gateway's Retry-After
    assert server.risk.requests == []


def test_risk_failures_open_the_breaker(server: RiskServer) -> None:
    breaker = closed_breaker("risk", BreakerConfig(min_calls=2))
    server.risk.abort_with = grpc.StatusCode.UNAVAILABLE

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            assessor = GrpcRiskAssessor(
                lambda: channel, timeout_seconds=TIMEOUT_SECONDS, breaker=breaker
            )
            for transfer_id in ("tr-1", "tr-2", "tr-3"):
                with pytest.raises(RiskUnavailableError):
                    await assessor.assess(transfer_request(), transfer_id=transfer_id)

    asyncio.run(run())
    assert breaker.state is BreakerState.OPEN
    # The third assessment was refused by the breaker: risk saw two.
    assert [r.transfer_id for r in server.risk.requests] == ["tr-1", "tr-2"]


STORE_FULL = "risk store not writable: database or disk is full"
RISK_STORE_OUT = (("ztbank-dependency-unavailable", "risk-store"),)


def test_a_full_risk_store_fails_closed_with_risks_cause(
    server: RiskServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What risk answers when its velocity store's disk is full (tests/unit/risk): the cause,
    tagged as its own dependency's outage, reaches the gateway's 503 through the engine."""
    server.risk.abort_with = grpc.StatusCode.UNAVAILABLE
    server.risk.abort_details = STORE_FULL
    server.risk.abort_trailers = RISK_STORE_OUT
    with caplog.at_level(logging.WARNING), pytest.raises(RiskUnavailableError) as refused:
        assess(server)
    assert str(refused.value) == f"risk service unavailable: {STORE_FULL}"
    assert refused.value.retry_after_seconds is None
    assert f"risk assessment of tr-1 failed: StatusCode.UNAVAILABLE {STORE_FULL}" in (
        caplog.messages
    )


@pytest.mark.parametrize(
    ("code", "trailers"),
    [
        (grpc.StatusCode.UNAVAILABLE, ()),  # risk's transport, or risk's own failure
        (grpc.StatusCode.INTERNAL, RISK_STORE_OUT),  # only an UNAVAILABLE names a dependency
    ],
    ids=["untagged", "not-unavailable"],
)
def test_other_failures_keep_their_details_in_our_log(
    server: RiskServer, code: grpc.StatusCode, trailers: tuple[tuple[str, str], ...]
) -> None:
    server.risk.abort_with = code
    server.risk.abort_details = STORE_FULL
    server.risk.abort_trailers = trailers
    with pytest.raises(RiskUnavailableError, match=r"^risk service unavailable$"):
        assess(server)


def test_a_full_risk_store_does_not_open_the_breaker_to_risk(server: RiskServer) -> None:
    """Risk answered, quickly: the breaker is for a risk that does not (a full disk is fixed
    by freeing space, and the next transfer then goes through at once)."""
    breaker = closed_breaker("risk", BreakerConfig(min_calls=2))
    server.risk.abort_with = grpc.StatusCode.UNAVAILABLE
    server.risk.abort_details = STORE_FULL
    server.risk.abort_trailers = RISK_STORE_OUT

    async def run() -> Assessment:
        async with grpc.aio.insecure_channel(server.target) as channel:
            assessor = GrpcRiskAssessor(
                lambda: channel, timeout_seconds=TIMEOUT_SECONDS, breaker=breaker
            )
            for transfer_id in ("tr-1", "tr-2", "tr-3"):
                with pytest.raises(RiskUnavailableError, match="disk is full"):
                    await assessor.assess(transfer_request(), transfer_id=transfer_id)
            server.risk.abort_with = None  # space is back
            return await assessor.assess(transfer_request(), transfer_id="tr-4")

    assert asyncio.run(run()).decision is Decision.ALLOW
    assert breaker.state is BreakerState.CLOSED
    assert [r.transfer_id for r in server.risk.requests] == ["tr-1", "tr-2", "tr-3", "tr-4"]
