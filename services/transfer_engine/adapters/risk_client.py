"""The ``RiskAssessor`` over gRPC: asks the risk service, behind the circuit breaker to it, and
fails closed on any doubt."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import grpc

from services._proto import risk_pb2
from services.common.errors import ChannelClosedError
from services.common.observability.telemetry import inject_context
from services.common.resilience.circuit import BreakerOpenError, CircuitBreaker
from services.common.resilience.trailers import unavailable_dependency
from services.common.risk_decision import RiskDecision
from services.transfer_engine.domain.model import Assessment, TransferRequest
from services.transfer_engine.errors import RiskUnavailableError

logger = logging.getLogger(__name__)

_ASSESS_METHOD = "/ztbank.risk.v1.Risk/Assess"


class GrpcRiskAssessor:
    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        *,
        timeout_seconds: float,
        breaker: CircuitBreaker,
    ) -> None:
        self._channel = channel
        self._timeout_seconds = timeout_seconds
        self._breaker = breaker

    async def assess(self, request: TransferRequest, *, transfer_id: str) -> Assessment:
        message = risk_pb2.AssessRequest(
            transfer_id=transfer_id,
            customer=request.customer,
            from_account=request.from_account,
            to_account=request.to_account,
            amount_minor=request.amount_minor,
            currency=request.currency,
        )
        try:
            ticket = self._breaker.admit()
        except BreakerOpenError as error:
            # No assessment, so the ledger writes nothing (fail closed); the transition's log
            # line says why the breaker opened.
            wait = math.ceil(error.retry_after)
            raise RiskUnavailableError(
                f"risk service unavailable: the circuit breaker to it is open; retry in {wait} s",
                retry_after_seconds=wait,
            ) from None
        try:
            # The ticket sees the call's own exception (risk's status) before it is translated.
            with ticket:
                # Looked up per call, never kept: the mTLS layer swaps channels when
                # certificates rotate or risk moves.
                assess = self._channel().unary_unary(
                    _ASSESS_METHOD,
                    request_serializer=risk_pb2.AssessRequest.SerializeToString,
                    response_deserializer=risk_pb2.Assessment.FromString,
                )
                reply = await assess(
                    message, timeout=self._timeout_seconds, metadata=inject_context()
                )
        except grpc.aio.AioRpcError as error:
            logger.warning(
                "risk assessment of %s failed: %s %s", transfer_id, error.code(), error.details()
            )
            if unavailable_dependency(error) is not None:
                # Risk answered that a dependency of its own is out (its store: a full disk);
                # it wrote that message for us to pass on.  Any other status's details stay in
                # our log: they may say more of risk than a customer should read.
                raise RiskUnavailableError(
                    f"risk service unavailable: {error.details()}"
                ) from error
            raise RiskUnavailableError("risk service unavailable") from error
        except (grpc.aio.UsageError, ChannelClosedError) as error:
            # A channel closed by a rotation after we fetched it, or by shutdown.
            logger.warning("risk assessment of %s failed: %s", transfer_id, error)
            raise RiskUnavailableError("risk service unavailable") from error
        try:
            decision = RiskDecision(reply.decision)
        except ValueError:
            logger.warning("risk answered %r for %s; failing closed", reply.decision, transfer_id)
            raise RiskUnavailableError("risk service unavailable") from None
        return Assessment(decision=decision, reasons=tuple(reply.reasons), score=reply.score)
