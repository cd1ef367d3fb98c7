"""Builds the transfer-engine's servicer from settings; the server adds mTLS around it."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.common.resilience.circuit import CircuitBreaker
from services.transfer_engine.adapters.risk_client import GrpcRiskAssessor
from services.transfer_engine.adapters.sqlite_ledger import SqliteLedgerRepository
from services.transfer_engine.domain.ledger import Ledger
from services.transfer_engine.settings import TransferEngineSettings
from services.transfer_engine.transport.servicer import TransferEngineService


def build_transfer_engine_service(
    settings: TransferEngineSettings,
    risk_channel: Callable[[], grpc.aio.Channel],
    risk_breaker: CircuitBreaker,
) -> TransferEngineService:
    """Opens (and seeds, once) the ledger; ``risk_channel`` is called for every assessment that
    ``risk_breaker`` lets through."""
    ledger = Ledger(
        repository=SqliteLedgerRepository(settings.ledger_path),
        risk=GrpcRiskAssessor(
            risk_channel, timeout_seconds=settings.risk_timeout_seconds, breaker=risk_breaker
        ),
    )
    ledger.ensure_seeded()
    return TransferEngineService(ledger, trust_domain=settings.trust_domain)
