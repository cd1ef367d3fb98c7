"""Builds the gateway: the FastAPI app under uvicorn with mutual TLS, SPIFFE authorization on
every request, and an mTLS channel to the transfer-engine that follows certificate rotation,
behind a circuit breaker."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import uvicorn

from services.common.identity.workloads import GATEWAY, TRANSFER_ENGINE
from services.common.mtls.contexts import ReloadingContext, SvidFiles
from services.common.mtls.grpc import MtlsChannel
from services.common.mtls.https import HttpsGuard, InFlight, mtls_server_config
from services.common.runtime.health import ServiceHealth, keep_watch
from services.common.runtime.service import ServiceRuntime, create_runtime
from services.gateway.adapters.engine_grpc import GrpcTransferEngine
from services.gateway.adapters.token_key import load_or_create_signing_key
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


@dataclass
class Gateway:
    """The HTTPS server and the engine channel it calls through, on one event loop."""

    http: uvicorn.Server
    engine: MtlsChannel
    health: ServiceHealth

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (uvicorn's handlers), then close the engine channel.

        uvicorn raises the signal that stopped it again once it has shut down, for the handler
        it found; with Python's default one that would kill the process before the channel,
        the runtime (audit, telemetry flush) are closed, so the signals are ignored outside
        uvicorn's serving time."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        with asyncio.Runner(loop_factory=self.http.config.get_loop_factory()) as runner:
            try:
                runner.run(self._serve())
            finally:
                runner.run(self.engine.aclose())

    async def _serve(self) -> None:
        watch = asyncio.create_task(keep_watch(self.health))
        try:
            await self.http.serve()
        finally:
            watch.cancel()


def create_server(settings: GatewaySettings) -> tuple[Gateway, ServiceRuntime]:
    # Before the runtime's threads start: a malformed table stops the gateway in one line.
    table = settings.trust_table()
    runtime = create_runtime(GATEWAY.name, settings)
    engine = runtime.channel_to(TRANSFER_ENGINE.name)
    breaker = runtime.breaker_to(TRANSFER_ENGINE, engine, table, settings.breaker)
    app = create_app(
        settings,
        GrpcTransferEngine(engine.channel, timeout=settings.engine_timeout, breaker=breaker),
        load_or_create_signing_key(settings.token_key_path),
        health=runtime.health,
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
    return Gateway(uvicorn.Server(config), engine, runtime.health), runtime
