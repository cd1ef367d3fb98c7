"""The TransferEngine gRPC API: customer claims accepted from the gateway only, domain errors
translated into gRPC statuses here and nowhere else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import grpc

from services._proto import ledger_pb2 as pb
from services._proto import ledger_pb2_grpc
from services.common.identity.workloads import GATEWAY
from services.common.mtls.grpc import AbortingContext
from services.common.mtls.peer import NoPeerIdentityError, current_peer
from services.common.resilience.trailers import DEPENDENCY_UNAVAILABLE_KEY, pushback_trailer
from services.transfer_engine.domain.ledger import Ledger
from services.transfer_engine.domain.model import Account, Transaction, Transfer, TransferRequest
from services.transfer_engine.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    LedgerStorageError,
    NotFoundError,
    NotOwnerError,
    RiskUnavailableError,
    TransferEngineError,
    UnavailableError,
)

GATEWAY_ONLY = "customer claims are accepted only from the gateway"
# The dependency an UNAVAILABLE about the ledger's own storage names (resilience/trailers.py).
LEDGER_STORE = "ledger-store"


def _status_of(error: TransferEngineError) -> grpc.StatusCode:
    match error:
        case InvalidRequestError():
            return grpc.StatusCode.INVALID_ARGUMENT
        case NotFoundError():
            return grpc.StatusCode.NOT_FOUND
        case NotOwnerError():
            return grpc.StatusCode.PERMISSION_DENIED
        case IdempotencyConflictError():
            return grpc.StatusCode.ALREADY_EXISTS
        case UnavailableError():
            return grpc.StatusCode.UNAVAILABLE
        case _:
            # An error class added without a mapping here is a bug of this file.
            return grpc.StatusCode.INTERNAL


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds")


def _account_message(account: Account) -> pb.Account:
    return pb.Account(
        id=account.id,
        customer=account.customer or "",
        currency=account.currency,
        balance_minor=account.balance_minor,
        name=account.name,
    )


def _transaction_message(transaction: Transaction) -> pb.Transaction:
    return pb.Transaction(
        transfer_id=transaction.transfer_id,
        account_id=transaction.account_id,
        amount_minor=transaction.amount_minor,
        currency=transaction.currency,
        counterparty_account=transaction.counterparty_account,
        balance_after_minor=transaction.balance_after_minor,
        created_at=_timestamp(transaction.created_at),
    )


def _transfer_message(transfer: Transfer) -> pb.Transfer:
    risk = transfer.assessment
    return pb.Transfer(
        id=transfer.id,
        customer=transfer.customer,
        from_account=transfer.from_account,
        to_account=transfer.to_account,
        amount_minor=transfer.amount_minor,
        currency=transfer.currency,
        status=transfer.status.value,
        risk=None
        if risk is None
        else pb.RiskAssessment(
            decision=risk.decision.value, reasons=list(risk.reasons), score=risk.score
        ),
        created_at=_timestamp(transfer.created_at),
        idempotency_key=transfer.idempotency_key or "",
        replayed=transfer.replayed,
        rejection_reason=transfer.rejection_reason.value if transfer.rejection_reason else "",
    )


class TransferEngineService(ledger_pb2_grpc.TransferEngineServicer):
    def __init__(self, ledger: Ledger, *, trust_domain: str) -> None:
        self._ledger = ledger
        self._gateway = GATEWAY.spiffe_id(trust_domain)

    @asynccontextmanager
    async def _serving(self, context: AbortingContext) -> AsyncIterator[None]:
        """The block runs for the gateway only, its domain errors becoming statuses."""
        try:
            caller = current_peer().spiffe_id
        except NoPeerIdentityError:
            # Only a wiring bug gets here (no mTLS interceptor ran): refuse rather than trust.
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no verified peer identity")
        if caller != self._gateway:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, GATEWAY_ONLY)
        try:
            yield
        except RiskUnavailableError as error:
            # The engine works, risk does not: the gateway's breaker counts this as an answer.
            trailers: tuple[tuple[str, str], ...] = ((DEPENDENCY_UNAVAILABLE_KEY, "risk"),)
            if error.retry_after_seconds is not None:
                trailers += (pushback_trailer(error.retry_after_seconds),)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error), trailers)
        except LedgerStorageError as error:
            # The engine answers, its storage does not (a full disk, say): the cause is the
            # operator's to read in the gateway's answer, and the breaker counts an answer.
            trailer = ((DEPENDENCY_UNAVAILABLE_KEY, LEDGER_STORE),)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error), trailer)
        except TransferEngineError as error:
            await context.abort(_status_of(error), str(error))

    async def ListAccounts(  # noqa: N802 - generated interface
        self, request: pb.ListAccountsRequest, context: AbortingContext
    ) -> pb.ListAccountsResponse:
        async with self._serving(context):
            accounts = self._ledger.accounts(request.customer)
        return pb.ListAccountsResponse(accounts=[_account_message(a) for a in accounts])

    async def GetAccount(  # noqa: N802
        self, request: pb.GetAccountRequest, context: AbortingContext
    ) -> pb.Account:
        async with self._serving(context):
            account = self._ledger.account(request.customer, request.account_id)
        return _account_message(account)

    async def ListTransactions(  # noqa: N802
        self, request: pb.ListTransactionsRequest, context: AbortingContext
    ) -> pb.ListTransactionsResponse:
        async with self._serving(context):
            transactions = self._ledger.transactions(
                request.customer, request.account_id, request.from_date
            )
        return pb.ListTransactionsResponse(
            transactions=[_transaction_message(t) for t in transactions]
        )

    async def CreateTransfer(  # noqa: N802
        self, request: pb.CreateTransferRequest, context: AbortingContext
    ) -> pb.Transfer:
        transfer_request = TransferRequest(
            customer=request.customer,
            idempotency_key=request.idempotency_key,
            from_account=request.from_account,
            to_account=request.to_account,
            amount_minor=request.amount_minor,
            currency=request.currency,
        )
        async with self._serving(context):
            transfer = await self._ledger.create_transfer(transfer_request)
        return _transfer_message(transfer)

    async def GetTransfer(  # noqa: N802
        self, request: pb.GetTransferRequest, context: AbortingContext
    ) -> pb.Transfer:
        async with self._serving(context):
            transfer = self._ledger.transfer(request.customer, request.transfer_id)
        return _transfer_message(transfer)
