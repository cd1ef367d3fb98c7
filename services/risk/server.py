"""Builds the risk service: its servicer behind the shared mTLS gRPC server."""

from __future__ import annotations

import grpc

from services._proto import risk_pb2_grpc
from services.common.runtime import ServiceRuntime, create_grpc_server, create_runtime
from services.common.workloads import RISK
from services.risk.settings import RiskSettings
from services.risk.transport.servicer import create_risk_service


def create_server(settings: RiskSettings) -> tuple[grpc.Server, ServiceRuntime]:
    runtime = create_runtime(RISK.name, settings)
    server = create_grpc_server(runtime)
    risk_pb2_grpc.add_RiskServicer_to_server(create_risk_service(settings), server)  # type: ignore[no-untyped-call]
    return server, runtime
