"""``python -m services.risk``: the risk service (gRPC, mTLS)."""

import sys

from services.common.runtime.entrypoint import run_service, serve_grpc
from services.risk.server import create_server
from services.risk.settings import RiskSettings

if __name__ == "__main__":
    sys.exit(run_service("risk", RiskSettings, create_server, serve_grpc))
