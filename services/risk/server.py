"""Builds the risk service: its servicer behind the shared mTLS gRPC server."""

from __future__ import annotations

import grpc

from services._proto import risk_pb2_grpc
from services.common.identity.workloads import RISK
from services.common.runtime.service import GrpcService, ServiceRuntime, create_runtime
from services.risk.settings import RiskSettings
from services.risk.transport.servicer import create_risk_service


def create_server(settings: RiskSettings) -> tuple[GrpcService, ServiceRuntime]:
    runtime = create_runtime(RISK.name, settings)
    servicer = create_risk_service(settings)

    def register(server: grpc.aio.Server) -> None:
        risk_pb2_grpc.add_RiskServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return GrpcService(runtime, register), runtime
