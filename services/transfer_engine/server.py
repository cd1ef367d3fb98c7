"""Builds the transfer-engine: the ledger servicer behind the shared mTLS gRPC server, with an
mTLS channel to risk that follows certificate rotation, behind a circuit breaker."""

from __future__ import annotations

import grpc

from services._proto import ledger_pb2_grpc
from services.common.identity.workloads import RISK, TRANSFER_ENGINE
from services.common.runtime.service import GrpcService, ServiceRuntime, create_runtime
from services.transfer_engine.factory import build_transfer_engine_service
from services.transfer_engine.settings import TransferEngineSettings


def create_server(settings: TransferEngineSettings) -> tuple[GrpcService, ServiceRuntime]:
    # Before the runtime's threads start: a malformed table stops the service in one line.
    table = settings.trust_table()
    runtime = create_runtime(TRANSFER_ENGINE.name, settings)
    risk = runtime.channel_to(RISK.name)
    breaker = runtime.breaker_to(RISK, risk, table, settings.breaker)
    servicer = build_transfer_engine_service(settings, risk.channel, breaker)

    def register(server: grpc.aio.Server) -> None:
        ledger_pb2_grpc.add_TransferEngineServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return GrpcService(runtime, register, channels=(risk,)), runtime
