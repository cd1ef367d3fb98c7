"""The grpc.aio adapter against a fake channel: real stubs and real (de)serialization, real
``AioRpcError``s, no sockets."""

import asyncio
from collections.abc import Callable
from datetime import date, timedelta
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message

from services._proto import ledger_pb2
from services.common.resilience.circuit import BreakerState
from services.common.resilience.settings import BreakerConfig
from services.common.risk_decision import RiskDecision
from services.gateway.adapters.engine_grpc import GrpcTransferEngine
from services.gateway.domain.ledger import (
    Account,
    RiskAssessment,
    Transaction,
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
from tests.support.breakers import closed_breaker, open_breaker

Handler = Callable[[Any], Message]


class FakeChannel:
    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.requests: list[tuple[str, Any, float | None]] = []

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
        **_: Any,
    ) -> Callable[..., Any]:
        name = method.rsplit("/", 1)[1]

        def call(request: Any, timeout: float | None = None, **__: Any) -> Any:
            # As grpc.aio: the request is serialized at once, the answer (or error) awaited.
            request_serializer(request)  # fails on a wrongly typed request, as grpcio would
            self.requests.append((name, request, timeout))

            async def answer() -> Any:
                return response_deserializer(self.handlers[name](request).SerializeToString())

            return answer()

        return call


@pytest.fixture
def channel() -> FakeChannel:
    return FakeChannel()


@pytest.fixture
def engine(channel: FakeChannel) -> GrpcTransferEngine:
    return GrpcTransferEngine(
        lambda: cast(grpc.aio.Channel, channel),
        timeout=timedelta(seconds=3),
        breaker=closed_breaker("transfer-engine"),
    )


def fail(code: grpc.StatusCode, details: str = "") -> Handler:
    def handler(request: Any) -> Message:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    return handler


def transfer_message(**changes: Any) -> ledger_pb2.Transfer:
    fields: dict[str, Any] = {
        "id": "tr-1",
        "customer": "alice",
        "from_account": "acc-a",
        "to_account": "acc-b",
        "amount_minor": 1234,
        "currency": "CNY",
        "status": "review",
        "risk": ledger_pb2.RiskAssessment(decision="review", reasons=["large"], score=61),
        "created_at": "2026-11-28T09:30:00Z",
        "idempotency_key": "k",
        "replayed": True,
    }
    fields.update(changes)
    return ledger_pb2.Transfer(**{k: v for k, v in fields.items() if v is not None})


def test_list_accounts(channel: FakeChannel, engine: GrpcTransferEngine) -> None:
    channel.handlers["ListAccounts"] = lambda request: ledger_pb2.ListAccountsResponse(
        accounts=[
            ledger_pb2.Account(
                id="acc-a",
                customer=request.customer,
                currency="CNY",
                balance_minor=-5,
                name="Current",
            )
        ]
    )

    assert asyncio.run(engine.list_accounts("alice")) == [
        Account("acc-a", "alice", "Current", "CNY", -5)
    ]
    assert channel.requests[0][1] == ledger_pb2.ListAccountsRequest(customer="alice")


def test_every_call_has_the_deadline_and_a_fresh_channel(channel: FakeChannel) -> None:
    handed_out: list[FakeChannel] = []

    def current() -> grpc.aio.Channel:
        handed_out.append(channel)
        return cast(grpc.aio.Channel, channel)

    engine = GrpcTransferEngine(
        current, timeout=timedelta(milliseconds=2500), breaker=closed_breaker("transfer-engine")
    )
    channel.handlers["ListAccounts"] = lambda _: ledger_pb2.ListAccountsResponse()

    asyncio.run(engine.list_accounts("alice"))
    asyncio.run(engine.list_accounts("bob"))

    assert len(handed_out) == 2
    assert [timeout for _, _, timeout in channel.requests] == [2.5, 2.5]


def test_get_account(channel: FakeChannel, engine: GrpcTransferEngine) -> None:
    channel.handlers["GetAccount"] = lambda request: ledger_pb2.Account(
        id=request.account_id, customer=request.customer, currency="CNY", balance_minor=1
    )

    assert asyncio.run(engine.get_account("bob", "acc-b")) == Account("acc-b", "bob", "", "CNY", 1)


@pytest.mark.parametrize(("day", "sent"), [(date(2026, 1, 2), "2026-01-02"), (None, "")])
def test_list_transactions(
    channel: FakeChannel, engine: GrpcTransferEngine, day: date | None, sent: str
) -> None:
    channel.handlers["ListTransactions"] = lambda request: ledger_pb2.ListTransactionsResponse(
        transactions=[
            ledger_pb2.Transaction(
                transfer_id="tr-1",
                account_id=request.account_id,
                amount_minor=-1234,
                currency="CNY",
                counterparty_account="acc-b",
                balance_after_minor=100,
                created_at="t",
            )
        ]
    )

    transactions = asyncio.run(engine.list_transactions("alice", "acc-a", day))

    assert transactions == [Transaction("tr-1", "acc-a", -1234, "CNY", "acc-b", 100, "t")]
    assert channel.requests[0][1].from_date == sent


def test_create_transfer(channel: FakeChannel, engine: GrpcTransferEngine) -> None:
    channel.handlers["CreateTransfer"] = lambda request: transfer_message()

    transfer = asyncio.run(
        engine.create_transfer("alice", "k", TransferOrder("acc-a", "acc-b", 1234, "CNY"))
    )

    assert channel.requests[0][1] == ledger_pb2.CreateTransferRequest(
        customer="alice",
        idempotency_key="k",
        from_account="acc-a",
        to_account="acc-b",
        amount_minor=1234,
        currency="CNY",
    )
    assert transfer.status is TransferStatus.REVIEW
    assert transfer.risk == RiskAssessment(RiskDecision.REVIEW, ("large",), 61)
    assert transfer.replayed is True
    assert transfer.carries_out("alice", TransferOrder("acc-a", "acc-b", 1234, "CNY"))


def test_transfer_without_risk(channel: FakeChannel, engine: GrpcTransferEngine) -> None:
    channel.handlers["GetTransfer"] = lambda _: transfer_message(status="rejected", risk=None)

    transfer = asyncio.run(engine.get_transfer("alice", "tr-1"))

    assert transfer.status is TransferStatus.REJECTED
    assert transfer.risk is None


@pytest.mark.parametrize(
    "message",
    [
        transfer_message(status="settled"),
        transfer_message(status=""),
        transfer_message(risk=ledger_pb2.RiskAssessment(decision="maybe")),
        transfer_message(currency="USD"),
    ],
)
def test_answers_the_gateway_cannot_trust_are_engine_errors(
    channel: FakeChannel, engine: GrpcTransferEngine, message: ledger_pb2.Transfer
) -> None:
    channel.handlers["GetTransfer"] = lambda _: message

    with pytest.raises(EngineError):
        asyncio.run(engine.get_transfer("alice", "tr-1"))


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (grpc.StatusCode.ALREADY_EXISTS, ConflictError),
        (grpc.StatusCode.UNAVAILABLE, EngineUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, EngineUnavailableError),
        (grpc.StatusCode.INTERNAL, EngineError),
        (grpc.StatusCode.UNKNOWN, EngineError),
        (grpc.StatusCode.UNAUTHENTICATED, EngineError),
        (grpc.StatusCode.FAILED_PRECONDITION, EngineError),
        (grpc.StatusCode.UNIMPLEMENTED, EngineError),
    ],
)
def test_statuses_map_to_gateway_errors(
    channel: FakeChannel,
    engine: GrpcTransferEngine,
    code: grpc.StatusCode,
    error: type[GatewayError],
) -> None:
    channel.handlers["GetTransfer"] = fail(code, "db at /var/lib/ledger.db is locked")

    with pytest.raises(error) as caught:
        asyncio.run(engine.get_transfer("alice", "tr-1"))

    assert type(caught.value) is error
    # The engine's words reach the customer only for problems with their own request.
    request_error = error in (
        NotFoundError,
        PermissionDeniedError,
        InvalidRequestError,
        ConflictError,
    )
    assert ("ledger.db" in str(caught.value)) is request_error


def test_a_bare_rpc_error_is_an_engine_error(
    channel: FakeChannel, engine: GrpcTransferEngine
) -> None:
    def bare(request: Any) -> Message:
        raise grpc.RpcError("no status")

    channel.handlers["ListAccounts"] = bare

    with pytest.raises(EngineError):
        asyncio.run(engine.list_accounts("alice"))


def test_an_open_breaker_answers_unavailable_without_calling_the_engine(
    channel: FakeChannel,
) -> None:
    engine = GrpcTransferEngine(
        lambda: cast(grpc.aio.Channel, channel),
        timeout=timedelta(seconds=3),
        breaker=open_breaker("transfer-engine"),
    )
    with pytest.raises(EngineUnavailableError) as refused:
        asyncio.run(engine.list_accounts("alice"))
    assert str(refused.value) == (
        "the transfer-engine is unavailable: the gateway's circuit breaker to it is open;"
        " retry in 1 s"
    )
    assert refused.value.retry_after_seconds == 1  # the gateway's Retry-After
    assert channel.requests == []


def test_engine_failures_open_the_breaker_and_its_refusals_do_not(channel: FakeChannel) -> None:
    breaker = closed_breaker("transfer-engine", BreakerConfig(min_calls=3))
    engine = GrpcTransferEngine(
        lambda: cast(grpc.aio.Channel, channel), timeout=timedelta(seconds=3), breaker=breaker
    )
    channel.handlers["GetAccount"] = fail(grpc.StatusCode.NOT_FOUND, "no such account")
    for _ in range(3):
        with pytest.raises(NotFoundError):
            asyncio.run(engine.get_account("alice", "acc-x"))
    assert breaker.state.value == "closed"  # the engine's answers are not failures
    channel.handlers["GetAccount"] = fail(grpc.StatusCode.UNAVAILABLE)
    for _ in range(3):
        with pytest.raises(EngineUnavailableError, match=r"\(StatusCode.UNAVAILABLE\)"):
            asyncio.run(engine.get_account("alice", "acc-x"))
    assert breaker.state is BreakerState.OPEN  # 3 of 6
    sent = len(channel.requests)
    with pytest.raises(EngineUnavailableError, match="circuit breaker to it is open"):
        asyncio.run(engine.get_account("alice", "acc-x"))
    assert len(channel.requests) == sent


def test_risk_out_at_the_engine_is_relayed_and_not_counted_against_the_engine(
    channel: FakeChannel,
) -> None:
    breaker = closed_breaker("transfer-engine", BreakerConfig(min_calls=2))
    engine = GrpcTransferEngine(
        lambda: cast(grpc.aio.Channel, channel), timeout=timedelta(seconds=3), breaker=breaker
    )

    def risk_out(request: Any) -> Message:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(
                ("ztbank-dependency-unavailable", "risk"), ("grpc-retry-pushback-ms", "2500")
            ),
            "risk service unavailable: the circuit breaker to it is open; retry in 3 s",
        )

    channel.handlers["CreateTransfer"] = risk_out
    order = TransferOrder("acc-a", "acc-b", 100, "CNY")
    for _ in range(4):
        with pytest.raises(EngineUnavailableError) as refused:
            asyncio.run(engine.create_transfer("alice", "k", order))
        assert str(refused.value) == (
            "the transfer-engine is unavailable: risk service unavailable: the circuit breaker"
            " to it is open; retry in 3 s"
        )
        assert refused.value.retry_after_seconds == 3  # the engine's pushback, rounded up
    assert breaker.state.value == "closed"  # reads keep flowing while risk is out
