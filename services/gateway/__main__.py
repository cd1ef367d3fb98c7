"""``python -m services.gateway``: the public HTTPS API (mutual TLS)."""

import sys

import uvicorn

from services.common.entrypoint import run_service
from services.common.runtime import ServiceRuntime
from services.gateway.server import create_server
from services.gateway.settings import GatewaySettings


def serve_https(server: uvicorn.Server, runtime: ServiceRuntime) -> None:
    try:
        server.run()
    finally:
        runtime.close()


if __name__ == "__main__":
    sys.exit(run_service("gateway", GatewaySettings, create_server, serve_https))
