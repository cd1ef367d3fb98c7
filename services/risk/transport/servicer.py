"""The risk gRPC servicer: only the transfer-engine may ask, and only well-formed transfers."""

from __future__ import annotations

import logging

import grpc

from services._proto import risk_pb2, risk_pb2_grpc
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import TRANSFER_ENGINE
from services.common.mtls.grpc import AbortingContext
from services.common.mtls.peer import NoPeerIdentityError, current_peer
from services.common.resilience.trailers import DEPENDENCY_UNAVAILABLE_KEY
from services.risk.adapters.rules_file import RulesFile
from services.risk.adapters.velocity_sqlite import SqliteVelocityHistory
from services.risk.domain.assessment import RiskAssessor, TransferRequest
from services.risk.errors import InvalidTransferError, VelocityStorageError, VelocityStoreError
from services.risk.settings import RiskSettings

logger = logging.getLogger(__name__)

# The dependency an UNAVAILABLE about the velocity history's storage names (trailers.py): risk
# itself answered, so the transfer-engine's breaker to risk counts an answer, and its message
# (the cause, e.g. a full disk) is the transfer-engine's to pass on.
RISK_STORE = "risk-store"


class RiskService(risk_pb2_grpc.RiskServicer):
    def __init__(self, assessor: RiskAssessor, *, allowed_caller: SpiffeId) -> None:
        self._assessor = assessor
        self._allowed_caller = allowed_caller

    async def Assess(  # noqa: N802 - generated interface
        self, request: risk_pb2.AssessRequest, context: AbortingContext
    ) -> risk_pb2.Assessment:
        await self._authorize(context)
        try:
            transfer = TransferRequest(
                transfer_id=request.transfer_id,
                customer=request.customer,
                from_account=request.from_account,
                to_account=request.to_account,
                amount_minor=request.amount_minor,
                currency=request.currency,
            )
        except InvalidTransferError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid transfer: {error}")
        try:
            assessment = self._assessor.assess(transfer)
        except VelocityStorageError as error:
            # A full disk, say: the operator's to fix, not a bug (a warning, no traceback).  No
            # history, no score: the transfer-engine holds the transfer and tells why.
            logger.warning("transfer %s not assessed: %s", transfer.transfer_id, error)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, str(error), ((DEPENDENCY_UNAVAILABLE_KEY, RISK_STORE),)
            )
        except VelocityStoreError as error:
            # No history, no score: the transfer-engine holds the transfer (fail closed).
            logger.error("transfer %s not assessed: %s", transfer.transfer_id, error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"risk cannot assess now: {error}")
        logger.info(
            "transfer %s: %s (score %d) %s",
            transfer.transfer_id,
            assessment.decision,
            assessment.score,
            ",".join(assessment.reasons) or "-",
        )
        return risk_pb2.Assessment(
            decision=assessment.decision,
            reasons=list(assessment.reasons),
            score=assessment.score,
        )

    async def _authorize(self, context: AbortingContext) -> None:
        # Defence in depth: the policy in front of this servicer already admits only the
        # transfer-engine, but a policy mistake must not open the risk oracle to anyone else.
        try:
            caller = current_peer().spiffe_id
        except NoPeerIdentityError:
            logger.error("Assess ran without a verified peer; the mTLS interceptor is missing")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no verified peer identity")
        if caller != self._allowed_caller:
            logger.warning("refused Assess from %s", caller)
            # The refusal does not name the allowed caller: that would tell a prober whom to be.
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller} may not call Assess")


def create_risk_service(settings: RiskSettings) -> RiskService:
    """Raises RulesError when the rules file cannot be read or is invalid: no rules, no start;
    VelocityStoreError when the velocity history cannot be opened."""
    rules = RulesFile(settings.risk_rules)
    assessor = RiskAssessor(rules, SqliteVelocityHistory(settings.velocity_path))
    return RiskService(assessor, allowed_caller=TRANSFER_ENGINE.spiffe_id(settings.trust_domain))
