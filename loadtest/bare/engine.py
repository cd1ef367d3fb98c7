"""The bare "engine": ``ztbank.ledger.v1.TransferEngine`` GetAccount and CreateTransfer over
grpc.aio with mutual TLS.

``python -m loadtest.bare.engine --port P --certs DIR --risk HOST:PORT --db PATH``.  Accounts
live in a dict; a transfer asks risk ``Assess`` over mTLS, then posts the transfer and its two
entries in one SQLite transaction (WAL, ``synchronous=FULL``: the commit is fsync'd) on a single
writer thread, which also owns the balances, and answers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from loadtest.bare.certs import CertFiles
from loadtest.bare.tls import (
    secure_channel,
    serve_until_terminated,
    server_arguments,
    server_credentials,
)
from services._proto import ledger_pb2, risk_pb2

SERVICE = "ztbank.ledger.v1.TransferEngine"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
RISK_TIMEOUT_SECONDS = 5.0
# The demo bank's accounts (services/transfer_engine/domain/seed.py), balances in fen.
ACCOUNTS = (
    ledger_pb2.Account(
        id="acc-alice-cny",
        customer="alice",
        currency="CNY",
        balance_minor=1_000_000,
        name="Alice current",
    ),
    ledger_pb2.Account(
        id="acc-alice-savings",
        customer="alice",
        currency="CNY",
        balance_minor=250_000,
        name="Alice savings",
    ),
    ledger_pb2.Account(
        id="acc-bob-cny",
        customer="bob",
        currency="CNY",
        balance_minor=500_000,
        name="Bob current",
    ),
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    customer TEXT NOT NULL,
    from_account TEXT NOT NULL,
    to_account TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
    transfer_id TEXT NOT NULL REFERENCES transfers(id),
    account_id TEXT NOT NULL,
    amount_minor INTEGER NOT NULL,
    balance_after_minor INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
"""


class InsufficientFundsError(Exception):
    pass


class Ledger:
    """Balances and their SQLite record; every method runs on the single writer thread, except
    ``account``, which only reads (one dict lookup and a message copy)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._accounts = {a.id: ledger_pb2.Account(**_fields(a)) for a in ACCOUNTS}

    def open(self) -> None:
        self._db = sqlite3.connect(self._path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def account(self, account_id: str) -> ledger_pb2.Account | None:
        return self._accounts.get(account_id)

    def post(self, transfer: ledger_pb2.Transfer) -> None:
        """Move the money: one transaction, committed (fsync) before the balances change."""
        assert self._db is not None
        source = self._accounts[transfer.from_account]
        target = self._accounts[transfer.to_account]
        if source.balance_minor < transfer.amount_minor:
            raise InsufficientFundsError(transfer.from_account)
        source_after = source.balance_minor - transfer.amount_minor
        target_after = target.balance_minor + transfer.amount_minor
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    transfer.id,
                    transfer.idempotency_key,
                    transfer.customer,
                    transfer.from_account,
                    transfer.to_account,
                    transfer.amount_minor,
                    transfer.currency,
                    transfer.status,
                    transfer.created_at,
                ),
            )
            db.executemany(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        transfer.id,
                        source.id,
                        -transfer.amount_minor,
                        source_after,
                        transfer.created_at,
                    ),
                    (
                        transfer.id,
                        target.id,
                        transfer.amount_minor,
                        target_after,
                        transfer.created_at,
                    ),
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        source.balance_minor = source_after
        target.balance_minor = target_after


def _fields(account: ledger_pb2.Account) -> dict[str, Any]:
    return {
        "id": account.id,
        "customer": account.customer,
        "currency": account.currency,
        "balance_minor": account.balance_minor,
        "name": account.name,
    }


class Engine:
    def __init__(self, ledger: Ledger, risk: grpc.aio.Channel) -> None:
        self._ledger = ledger
        # One writer thread: SQLite has one writer anyway, and the event loop never blocks on
        # an fsync.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        self._assess = risk.unary_unary(
            ASSESS,
            request_serializer=risk_pb2.AssessRequest.SerializeToString,
            response_deserializer=risk_pb2.Assessment.FromString,
        )

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, self._ledger.open)

    async def get_account(
        self, request: ledger_pb2.GetAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.Account:
        account = self._ledger.account(request.account_id)
        if account is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no account {request.account_id}")
        return account

    async def create_transfer(
        self,
        request: ledger_pb2.CreateTransferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ledger_pb2.Transfer:
        for account_id in (request.from_account, request.to_account):
            if self._ledger.account(account_id) is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no account {account_id}")
        transfer_id = f"tr-{uuid.uuid4().hex}"
        assessment = await self._assess(
            risk_pb2.AssessRequest(
                transfer_id=transfer_id,
                customer=request.customer,
                from_account=request.from_account,
                to_account=request.to_account,
                amount_minor=request.amount_minor,
                currency=request.currency,
            ),
            timeout=RISK_TIMEOUT_SECONDS,
        )
        transfer = ledger_pb2.Transfer(
            id=transfer_id,
            customer=request.customer,
            from_account=request.from_account,
            to_account=request.to_account,
            amount_minor=request.amount_minor,
            currency=request.currency,
            status="posted",
            risk=ledger_pb2.RiskAssessment(
                decision=assessment.decision,
                reasons=list(assessment.reasons),
                score=assessment.score,
            ),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            idempotency_key=request.idempotency_key,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._ledger.post, transfer)
        except InsufficientFundsError:
            transfer.status = "rejected"
            transfer.rejection_reason = "insufficient_funds"
        except sqlite3.IntegrityError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "idempotency key already used")
        return transfer

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetAccount": grpc.unary_unary_rpc_method_handler(
                    self.get_account,
                    request_deserializer=ledger_pb2.GetAccountRequest.FromString,
                    response_serializer=ledger_pb2.Account.SerializeToString,
                ),
                "CreateTransfer": grpc.unary_unary_rpc_method_handler(
                    self.create_transfer,
                    request_deserializer=ledger_pb2.CreateTransferRequest.FromString,
                    response_serializer=ledger_pb2.Transfer.SerializeToString,
                ),
            },
        )


async def serve(port: int, files: CertFiles, risk_target: str, db: Path) -> None:
    async with secure_channel(files, risk_target, "risk") as risk:
        engine = Engine(Ledger(db), risk)
        await engine.start()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((engine.handler(),))
        server.add_secure_port(f"127.0.0.1:{port}", server_credentials(files))
        await serve_until_terminated(server)


def main() -> None:
    parser = server_arguments(__doc__)
    parser.add_argument("--risk", required=True, help="HOST:PORT of the risk server")
    parser.add_argument("--db", type=Path, required=True, help="SQLite file of the postings")
    args = parser.parse_args()
    asyncio.run(serve(args.port, CertFiles(args.certs, "engine"), args.risk, args.db))


if __name__ == "__main__":
    main()
