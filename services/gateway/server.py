"""Builds the gateway: the FastAPI app under uvicorn with mutual TLS, SPIFFE authorization on
every request, and an mTLS channel to the transfer-engine that follows certificate rotation."""

from __future__ import annotations

import uvicorn

from services.common.https_mtls import HttpsGuard, InFlight, mtls_server_config
from services.common.runtime import ServiceRuntime, create_runtime
from services.common.tls import ReloadingContext, SvidFiles
from services.common.workloads import GATEWAY, TRANSFER_ENGINE
from services.gateway.adapters.engine_grpc import GrpcTransferEngine
from services.gateway.adapters.token_key import load_or_create_signing_key
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def create_server(settings: GatewaySettings) -> tuple[uvicorn.Server, ServiceRuntime]:
    runtime = create_runtime(GATEWAY.name, settings)
    engine = runtime.channel_to(TRANSFER_ENGINE.name)
    app = create_app(
        settings,
        GrpcTransferEngine(engine.channel, timeout=settings.engine_timeout),
        load_or_create_signing_key(settings.token_key_path),
    )
    tls = ReloadingContext(runtime.source, SvidFiles(settings.state_dir / "tls"), server=True)
    guard = HttpsGuard(
        service=GATEWAY.name,
        verifier=runtime.verifier,
        policy=runtime.policy,
        audit=runtime.audit,
        telemetry=runtime.telemetry,
        in_flight=InFlight(settings.max_in_flight),
    )

    config = mtls_server_config(
        app,
        guard,
        lambda: tls.context,
        host=runtime.address.host,
        port=runtime.address.port,
    )
    return uvicorn.Server(config), runtime
