import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from services._proto import risk_pb2, risk_pb2_grpc
from services.transfer_engine.adapters.risk_client import GrpcRiskAssessor
from services.transfer_engine.domain.model import Assessment, Decision
from services.transfer_engine.errors import RiskUnavailableError
from tests.unit.transfer_engine.support import transfer_request

TIMEOUT_SECONDS = 0.2


class ScriptedRisk(risk_pb2_grpc.RiskServicer):
    def __init__(self, decision: str) -> None:
        self.decision = decision
        self.abort_with: grpc.StatusCode | None = None
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.stall = False
        self.requests: list[risk_pb2.AssessRequest] = []

    def Assess(
        self, request: risk_pb2.AssessRequest, context: grpc.ServicerContext
    ) -> risk_pb2.Assessment:
        self.requests.append(request)
        if self.abort_with is not None:
            context.abort(self.abort_with, "scripted failure")
        if self.stall:
            self.stalled.set()
            self.release.wait(5)
        return risk_pb2.Assessment(decision=self.decision, reasons=["velocity"], score=42)


class RiskServer:
    def __init__(self, decision: str = "allow") -> None:
        self.risk = ScriptedRisk(decision)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        risk_pb2_grpc.add_RiskServicer_to_server(self.risk, self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def stop(self) -> None:
        self.risk.release.set()
        self.channel.close()
        self._server.stop(grace=None)


@pytest.fixture
def server() -> Iterator[RiskServer]:
    server = RiskServer()
    yield server
    server.stop()


def assessor_for(server: RiskServer) -> GrpcRiskAssessor:
    return GrpcRiskAssessor(lambda: server.channel, timeout_seconds=TIMEOUT_SECONDS)


@pytest.mark.parametrize("decision", list(Decision))
def test_answers_become_assessments(server: RiskServer, decision: Decision) -> None:
    server.risk.decision = decision.value
    assessment = assessor_for(server).assess(transfer_request(), transfer_id="tr-1")
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
    current = [server.channel]
    assessor = GrpcRiskAssessor(lambda: current[0], timeout_seconds=TIMEOUT_SECONDS)
    try:
        assert assessor.assess(transfer_request(), transfer_id="tr-1").decision is Decision.ALLOW
        current[0] = replacement.channel  # what a certificate rotation does
        assert assessor.assess(transfer_request(), transfer_id="tr-2").decision is Decision.DENY
    finally:
        replacement.stop()


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.PERMISSION_DENIED],
)
def test_errors_fail_closed(server: RiskServer, code: grpc.StatusCode) -> None:
    server.risk.abort_with = code
    with pytest.raises(RiskUnavailableError, match=r"^risk service unavailable$"):
        assessor_for(server).assess(transfer_request(), transfer_id="tr-1")


def test_a_slow_answer_fails_closed(server: RiskServer) -> None:
    server.risk.stall = True
    with pytest.raises(RiskUnavailableError):
        assessor_for(server).assess(transfer_request(), transfer_id="tr-1")
    assert server.risk.stalled.is_set()


def test_an_unknown_decision_fails_closed(server: RiskServer) -> None:
    server.risk.decision = "maybe"
    with pytest.raises(RiskUnavailableError):
        assessor_for(server).assess(transfer_request(), transfer_id="tr-1")


def test_a_channel_closed_by_rotation_fails_closed(server: RiskServer) -> None:
    server.channel.close()
    with pytest.raises(RiskUnavailableError):
        assessor_for(server).assess(transfer_request(), transfer_id="tr-1")
