"""The transfer-engine over grpc.aio: domain calls -> ``ledger.proto`` messages, and gRPC statuses
-> gateway errors.  Everything the engine answers is checked before the domain sees it.  Every
call goes through the circuit breaker to the engine (``services.common.resilience.circuit``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import grpc
from google.protobuf.message import Message

from services._proto import ledger_pb2
from services._proto.ledger_pb2_grpc import TransferEngineStub
from services.common.errors import ChannelClosedError
from services.common.money import UnsupportedCurrencyError, currency_exponent
from services.common.observability.telemetry import inject_context
from services.common.resilience.circuit import BreakerOpenError, CircuitBreaker
from services.common.resilience.trailers import retry_pushback_seconds, unavailable_dependency
from services.common.risk_decision import RiskDecision
from services.gateway.domain.ledger import (
    Account,
    RiskAssessment,
    Transaction,
    Transfer,
    TransferOrder,
    TransferStatus,
)
from services.gateway.errors import (
    ConflictError,
    EngineError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)

logger = logging.getLogger(__name__)

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Statuses that describe the customer's request; the engine's message is meant for them.
_REQUEST_ERRORS: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
}


def _translate(method: str, error: grpc.RpcError) -> GatewayError:
    # grpc.aio raises AioRpcError (blocking grpcio an RpcError that is also a Call); a bare
    # RpcError has no code.
    code, details = (
        (error.code(), error.details())
        if isinstance(error, grpc.aio.AioRpcError | grpc.Call)
        else (None, "")
    )
    if isinstance(error, grpc.aio.AioRpcError) and unavailable_dependency(error) is not None:
        # The engine answered that a dependency of its own (risk) is out; its message is ours
        # and tells the client that nothing was stored.
        return EngineUnavailableError(
            f"the transfer-engine is unavailable: {details}",
            retry_after_seconds=retry_pushback_seconds(error),
        )
    if code in _UNAVAILABLE:
        return EngineUnavailableError(f"the transfer-engine is unavailable ({code})")
    request_error = _REQUEST_ERRORS.get(code) if code is not None else None
    if request_error is not None:
        return request_error(details or f"the transfer-engine refused the request ({code})")
    # Internal failures stay in our logs, not in the customer's response.
    logger.warning("transfer-engine %s failed: %s %s", method, code, details)
    return EngineError(f"the transfer-engine failed on {method}")


def _currency(value: str) -> str:
    try:
        currency_exponent(value)
    except UnsupportedCurrencyError:
        raise EngineError(
            f"the transfer-engine answered in an unsupported currency {value!r}"
        ) from None
    return value


def _account(message: ledger_pb2.Account) -> Account:
    return Account(
        id=message.id,
        customer=message.customer,
        name=message.name,
        currency=_currency(message.currency),
        balance_minor=message.balance_minor,
    )


def _transaction(message: ledger_pb2.Transaction) -> Transaction:
    return Transaction(
        transfer_id=message.transfer_id,
        account_id=message.account_id,
        amount_minor=message.amount_minor,
        currency=_currency(message.currency),
        counterparty_account=message.counterparty_account,
        balance_after_minor=message.balance_after_minor,
        created_at=message.created_at,
    )


def _transfer(message: ledger_pb2.Transfer) -> Transfer:
    try:
        status = TransferStatus(message.status)
        risk = (
            RiskAssessment(
                decision=RiskDecision(message.risk.decision),
                reasons=tuple(message.risk.reasons),
                score=message.risk.score,
            )
            if message.HasField("risk")
            else None
        )
    except ValueError as error:
        raise EngineError(f"the transfer-engine answered an unknown value: {error}") from None
    return Transfer(
        id=message.id,
        customer=message.customer,
        from_account=message.from_account,
        to_account=message.to_account,
        amount_minor=message.amount_minor,
        currency=_currency(message.currency),
        status=status,
        risk=risk,
        created_at=message.created_at,
        replayed=message.replayed,
        rejection_reason=message.rejection_reason,
    )


class GrpcTransferEngine:
    """``TransferEngine`` over a grpc.aio channel that ``channel()`` hands out afresh per call
    (it is replaced when our SVID rotates or the engine moves), behind ``breaker``."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        *,
        timeout: timedelta,
        breaker: CircuitBreaker,
    ) -> None:
        self._channel = channel
        self._timeout = timeout.total_seconds()
        self._breaker = breaker
        self._stub: tuple[grpc.aio.Channel, Any] | None = None

    def _stub_for(self, channel: grpc.aio.Channel) -> Any:
        # One stub per channel: building one binds every method of the service.
        if self._stub is None or self._stub[0] is not channel:
            # The generated stub has no annotations, hence the ignore.
            self._stub = (channel, TransferEngineStub(channel))  # type: ignore[no-untyped-call]
        return self._stub[1]

    async def _call(self, method: str, request: Message) -> Any:
        try:
            ticket = self._breaker.admit()
        except BreakerOpenError as error:
            # Why it opened is in the transition's log line, not in the customer's answer.
            wait = math.ceil(error.retry_after)
            raise EngineUnavailableError(
                "the transfer-engine is unavailable: the gateway's circuit breaker to it is"
                f" open; retry in {wait} s",
                retry_after_seconds=wait,
            ) from None
        try:
            # The ticket sees the call's own exception (the callee's status), then it is
            # translated.
            with ticket:
                stub = self._stub_for(self._channel())
                call = getattr(stub, method)
                return await call(request, timeout=self._timeout, metadata=inject_context())
        except ChannelClosedError as error:
            raise EngineUnavailableError(str(error)) from None
        except grpc.RpcError as error:
            raise _translate(method, error) from None

    async def list_accounts(self, customer: str) -> list[Account]:
        request = ledger_pb2.ListAccountsRequest(customer=customer)
        response = await self._call("ListAccounts", request)
        return [_account(account) for account in response.accounts]

    async def get_account(self, customer: str, account_id: str) -> Account:
        request = ledger_pb2.GetAccountRequest(customer=customer, account_id=account_id)
        return _account(await self._call("GetAccount", request))

    async def list_transactions(
        self, customer: str, account_id: str, from_date: date | None
    ) -> list[Transaction]:
        request = ledger_pb2.ListTransactionsRequest(
            customer=customer,
            account_id=account_id,
            from_date=from_date.isoformat() if from_date else "",
        )
        response = await self._call("ListTransactions", request)
        return [_transaction(transaction) for transaction in response.transactions]

    async def create_transfer(
        self, customer: str, idempotency_key: str, order: TransferOrder
    ) -> Transfer:
        request = ledger_pb2.CreateTransferRequest(
            customer=customer,
            idempotency_key=idempotency_key,
            from_account=order.from_account,
            to_account=order.to_account,
            amount_minor=order.amount_minor,
            currency=order.currency,
        )
        return _transfer(await self._call("CreateTransfer", request))

    async def get_transfer(self, customer: str, transfer_id: str) -> Transfer:
        request = ledger_pb2.GetTransferRequest(customer=customer, transfer_id=transfer_id)
        return _transfer(await self._call("GetTransfer", request))
