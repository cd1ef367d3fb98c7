"""The bare "risk" server: ``ztbank.risk.v1.Risk/Assess`` over grpc.aio with mutual TLS.

``python -m loadtest.bare.risk --port P --certs DIR``.  Every transfer is allowed; the score is
a plain function of the amount, so the answer has the size of ztbank's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from loadtest.bare.certs import CertFiles
from loadtest.bare.tls import serve_until_terminated, server_arguments, server_credentials
from services._proto import risk_pb2

SERVICE = "ztbank.risk.v1.Risk"
# minor units per score point: 10,000.00 CNY scores 100
SCORE_UNIT = 10_000


async def assess(
    request: risk_pb2.AssessRequest, context: grpc.aio.ServicerContext[Any, Any]
) -> risk_pb2.Assessment:
    score = min(100, request.amount_minor // SCORE_UNIT)
    return risk_pb2.Assessment(decision="allow", reasons=[], score=score)


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Assess": grpc.unary_unary_rpc_method_handler(
                assess,
                request_deserializer=risk_pb2.AssessRequest.FromString,
                response_serializer=risk_pb2.Assessment.SerializeToString,
            )
        },
    )


async def serve(port: int, files: CertFiles) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(),))
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(files))
    await serve_until_terminated(server)


def main() -> None:
    args = server_arguments(__doc__).parse_args()
    asyncio.run(serve(args.port, CertFiles(args.certs, "risk")))


if __name__ == "__main__":
    main()
