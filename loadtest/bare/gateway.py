"""The bare gateway: FastAPI under uvicorn, HTTPS with a required client certificate, calling the
engine over grpc.aio with mutual TLS.

``python -m loadtest.bare.gateway --port P --certs DIR --engine HOST:PORT``.  The same paths and
JSON as ztbank's gateway for ``GET /v1/accounts/{id}``, ``POST /v1/transfers`` and ``GET
/healthz``; no token, no authorization, no audit: whoever completes the TLS handshake is served
as the customer alice.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import grpc
import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from loadtest.bare.certs import CertFiles
from loadtest.bare.tls import harden, secure_channel, server_arguments
from services._proto import ledger_pb2
from services.common.money import InvalidAmountError, format_amount, parse_amount

CUSTOMER = "alice"  # no tokens here: every caller acts for the demo customer
ENGINE_TIMEOUT_SECONDS = 5.0
_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.INVALID_ARGUMENT: 422,
}


class TransferIn(BaseModel):
    from_account: str
    to_account: str
    amount: str
    currency: str


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"status": status, "detail": detail}, status_code=status)


def _engine_error(error: grpc.aio.AioRpcError) -> JSONResponse:
    return _error(_HTTP_STATUS.get(error.code(), 502), error.details() or str(error.code()))


class _EngineCalls:
    """The engine's two methods, bound to a channel once the event loop runs."""

    get_account: grpc.aio.UnaryUnaryMultiCallable[ledger_pb2.GetAccountRequest, ledger_pb2.Account]
    create_transfer: grpc.aio.UnaryUnaryMultiCallable[
        ledger_pb2.CreateTransferRequest, ledger_pb2.Transfer
    ]


def create_app(files: CertFiles, engine_target: str) -> FastAPI:
    calls = _EngineCalls()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A grpc.aio channel belongs to the running loop: it is made here, not at import.
        async with secure_channel(files, engine_target, "engine") as channel:
            calls.get_account = channel.unary_unary(
                "/ztbank.ledger.v1.TransferEngine/GetAccount",
                request_serializer=ledger_pb2.GetAccountRequest.SerializeToString,
                response_deserializer=ledger_pb2.Account.FromString,
            )
            calls.create_transfer = channel.unary_unary(
                "/ztbank.ledger.v1.TransferEngine/CreateTransfer",
                request_serializer=ledger_pb2.CreateTransferRequest.SerializeToString,
                response_deserializer=ledger_pb2.Transfer.FromString,
            )
            yield

    app = FastAPI(title="bare gateway", lifespan=lifespan, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/accounts/{account_id}")
    async def get_account(account_id: str) -> JSONResponse:
        request = ledger_pb2.GetAccountRequest(customer=CUSTOMER, account_id=account_id)
        try:
            account = await calls.get_account(request, timeout=ENGINE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            return _engine_error(error)
        return JSONResponse(
            {
                "id": account.id,
                "name": account.name,
                "currency": account.currency,
                "balance": format_amount(account.balance_minor, account.currency),
            }
        )

    @app.post("/v1/transfers")
    async def create_transfer(
        body: TransferIn,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    ) -> JSONResponse:
        if not idempotency_key:
            return _error(400, "an Idempotency-Key header is required")
        try:
            amount_minor = parse_amount(body.amount, body.currency)
        except (InvalidAmountError, ValueError) as error:
            return _error(422, str(error))
        request = ledger_pb2.CreateTransferRequest(
            customer=CUSTOMER,
            idempotency_key=idempotency_key,
            from_account=body.from_account,
            to_account=body.to_account,
            amount_minor=amount_minor,
            currency=body.currency,
        )
        try:
            transfer = await calls.create_transfer(request, timeout=ENGINE_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            return _engine_error(error)
        location = f"/v1/transfers/{transfer.id}"
        return JSONResponse(
            {
                "id": transfer.id,
                "status": transfer.status,
                "from_account": transfer.from_account,
                "to_account": transfer.to_account,
                "amount": format_amount(transfer.amount_minor, transfer.currency),
                "currency": transfer.currency,
                "risk": {
                    "decision": transfer.risk.decision,
                    "reasons": list(transfer.risk.reasons),
                    "score": transfer.risk.score,
                },
                "created_at": transfer.created_at,
            },
            status_code=201 if transfer.status == "posted" else 422,
            headers={"Location": location},
        )

    return app


def main() -> None:
    parser = server_arguments(__doc__)
    parser.add_argument("--engine", required=True, help="HOST:PORT of the engine")
    args = parser.parse_args()
    files = CertFiles(args.certs, "gateway")
    config = uvicorn.Config(
        create_app(files, args.engine),
        host="127.0.0.1",
        port=args.port,
        ssl_certfile=str(files.cert),
        ssl_keyfile=str(files.key),
        ssl_ca_certs=str(files.ca),
        ssl_cert_reqs=ssl.CERT_REQUIRED,
        # uvicorn's default: httptools (llhttp, in C) when installed, else h11, as ztbank's.
        http="auto",
        loop="asyncio",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    config.load()
    assert config.ssl is not None
    harden(config.ssl)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
