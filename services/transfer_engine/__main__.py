"""``python -m services.transfer_engine``: the ledger (gRPC, mTLS)."""

import sys

from services.common.runtime.entrypoint import run_service, serve_grpc
from services.transfer_engine.server import create_server
from services.transfer_engine.settings import TransferEngineSettings

if __name__ == "__main__":
    sys.exit(run_service("transfer-engine", TransferEngineSettings, create_server, serve_grpc))
