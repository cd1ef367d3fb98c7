"""``python -m services.gateway``: the public HTTPS API (mutual TLS)."""

import sys

from services.common.runtime.entrypoint import run_service
from services.common.runtime.service import ServiceRuntime
from services.gateway.server import Gateway, create_server
from services.gateway.settings import GatewaySettings


def serve_https(server: Gateway, runtime: ServiceRuntime) -> None:
    try:
        server.run()
    finally:
        runtime.close()


if __name__ == "__main__":
    sys.exit(run_service("gateway", GatewaySettings, create_server, serve_https))
