import asyncio
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
import pytest
from google.protobuf.message import Message

from services._proto import ledger_pb2 as pb
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, RISK, TELLER
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.risk_decision import RiskDecision as Decision
from services.transfer_engine import errors
from services.transfer_engine.domain.ledger import Ledger
from services.transfer_engine.transport import servicer
from services.transfer_engine.transport.servicer import GATEWAY_ONLY, TransferEngineService
from tests.support.grpc_context import AbortedError, FakeServicerContext
from tests.unit.transfer_engine.fakes import FakeClock, FakeRisk, InMemoryLedgerRepository

TD = "ztbank.example"


@contextmanager
def as_peer(spiffe_id: SpiffeId | None) -> Iterator[None]:
    """What the mTLS interceptor does before the servicer runs."""
    peer = None if spiffe_id is None else PeerIdentity(spiffe_id, "0a", "ff" * 32, "127.0.0.1:5000")
    token = set_current_peer(peer)
    try:
        yield
    finally:
        reset_current_peer(token)


@pytest.fixture(autouse=True)
def from_gateway() -> Iterator[None]:
    with as_peer(GATEWAY.spiffe_id(TD)):
        yield


@pytest.fixture
def service(risk: FakeRisk, clock: FakeClock) -> TransferEngineService:
    ledger = Ledger(repository=InMemoryLedgerRepository(), risk=risk, clock=clock)
    ledger.ensure_seeded()
    return TransferEngineService(ledger, trust_domain=TD)


def create_request(**fields: object) -> pb.CreateTransferRequest:
    body: dict[str, object] = {
        "customer": "alice",
        "idempotency_key": "key-1",
        "from_account": "acc-alice-cny",
        "to_account": "acc-bob-cny",
        "amount_minor": 12_345,
        "currency": "CNY",
    }
    return pb.CreateTransferRequest(**(body | fields))  # type: ignore[arg-type]


Call = Callable[[TransferEngineService, FakeServicerContext], Coroutine[Any, Any, Message]]

EVERY_METHOD: dict[str, Call] = {
    "ListAccounts": lambda s, c: s.ListAccounts(pb.ListAccountsRequest(customer="alice"), c),
    "GetAccount": lambda s, c: s.GetAccount(
        pb.GetAccountRequest(customer="alice", account_id="acc-alice-cny"), c
    ),
    "ListTransactions": lambda s, c: s.ListTransactions(
        pb.ListTransactionsRequest(customer="alice", account_id="acc-alice-cny"), c
    ),
    "CreateTransfer": lambda s, c: s.CreateTransfer(create_request(), c),
    "GetTransfer": lambda s, c: s.GetTransfer(
        pb.GetTransferRequest(customer="alice", transfer_id="tr-opening-acc-alice-cny"), c
    ),
}


def refusal(service: TransferEngineService, call: Call) -> AbortedError:
    with pytest.raises(AbortedError) as aborted:
        asyncio.run(call(service, FakeServicerContext()))
    return aborted.value


def create(service: TransferEngineService, **fields: object) -> pb.Transfer:
    return asyncio.run(service.CreateTransfer(create_request(**fields), FakeServicerContext()))


# -- who may call ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", EVERY_METHOD)
@pytest.mark.parametrize(
    "caller",
    [
        TELLER.spiffe_id(TD),
        RISK.spiffe_id(TD),
        GATEWAY.spiffe_id("other.example"),
        SpiffeId(TD, "/env/dev/zone/az1/team/channels/svc/gateway"),
    ],
    ids=str,
)
def test_only_the_gateway_may_make_customer_claims(
    service: TransferEngineService, risk: FakeRisk, method: str, caller: SpiffeId
) -> None:
    with as_peer(caller):
        aborted = refusal(service, EVERY_METHOD[method])
    assert (aborted.code, aborted.details) == (grpc.StatusCode.PERMISSION_DENIED, GATEWAY_ONLY)
    assert risk.calls == []


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_a_request_without_a_verified_peer_is_refused(
    service: TransferEngineService, method: str
) -> None:
    with as_peer(None):
        aborted = refusal(service, EVERY_METHOD[method])
    assert aborted.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_the_gateway_is_served(service: TransferEngineService, method: str) -> None:
    assert asyncio.run(EVERY_METHOD[method](service, FakeServicerContext())).ByteSize() > 0


@pytest.mark.parametrize(
    "call",
    [
        lambda s, c: s.ListAccounts(pb.ListAccountsRequest(), c),
        lambda s, c: s.GetAccount(pb.GetAccountRequest(account_id="acc-alice-cny"), c),
        lambda s, c: s.ListTransactions(pb.ListTransactionsRequest(account_id="acc-alice-cny"), c),
        lambda s, c: s.CreateTransfer(create_request(customer=""), c),
        lambda s, c: s.GetTransfer(pb.GetTransferRequest(transfer_id="tr-x"), c),
    ],
    ids=list(EVERY_METHOD),
)
def test_an_empty_customer_is_invalid(service: TransferEngineService, call: Call) -> None:
    aborted = refusal(service, call)
    assert (aborted.code, aborted.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "customer is required",
    )


# -- answers --------------------------------------------------------------------------------


def test_accounts_and_transactions(service: TransferEngineService) -> None:
    context = FakeServicerContext()
    listed = asyncio.run(service.ListAccounts(pb.ListAccountsRequest(customer="alice"), context))
    assert [(a.id, a.name, a.balance_minor, a.currency, a.customer) for a in listed.accounts] == [
        ("acc-alice-cny", "Alice current", 1_000_000, "CNY", "alice"),
        ("acc-alice-savings", "Alice savings", 250_000, "CNY", "alice"),
    ]
    transfer = create(service)
    history = asyncio.run(
        service.ListTransactions(
            pb.ListTransactionsRequest(
                customer="bob", account_id="acc-bob-cny", from_date="2024-05-01"
            ),
            context,
        )
    )
    assert [
        (t.transfer_id, t.amount_minor, t.counterparty_account, t.balance_after_minor)
        for t in history.transactions
    ] == [
        (transfer.id, 12_345, "acc-alice-cny", 512_345),
        ("tr-opening-acc-bob-cny", 500_000, "acc-bank-equity", 500_000),
    ]
    assert history.transactions[0].created_at == "2024-05-01T09:00:00+00:00"


def test_posted_transfer_and_its_replay(service: TransferEngineService) -> None:
    transfer = create(service)
    assert (transfer.status, transfer.replayed, transfer.risk.decision) == (
        "posted",
        False,
        "allow",
    )
    assert (transfer.from_account, transfer.to_account, transfer.amount_minor) == (
        "acc-alice-cny",
        "acc-bob-cny",
        12_345,
    )
    assert transfer.idempotency_key == "key-1"
    replay = create(service)
    assert (replay.id, replay.status, replay.replayed) == (transfer.id, "posted", True)
    fetched = asyncio.run(
        service.GetTransfer(
            pb.GetTransferRequest(customer="alice", transfer_id=transfer.id),
            FakeServicerContext(),
        )
    )
    assert fetched == transfer


def test_rejections_are_answers_not_errors(service: TransferEngineService, risk: FakeRisk) -> None:
    broke = create(service, from_account="acc-alice-savings", amount_minor=250_001)
    assert (broke.status, broke.risk.decision) == ("rejected", "allow")
    risk.answer_with(Decision.DENY, "blocklisted_account", score=97)
    denied = create(service, idempotency_key="key-2")
    assert (denied.status, list(denied.risk.reasons), denied.risk.score) == (
        "rejected",
        ["blocklisted_account"],
        97,
    )
    risk.answer_with(Decision.REVIEW, "amount_above_review_threshold")
    assert create(service, idempotency_key="key-3").status == "review"


def test_opening_transfers_carry_no_risk_assessment(service: TransferEngineService) -> None:
    opening = asyncio.run(
        service.GetTransfer(
            pb.GetTransferRequest(customer="bob", transfer_id="tr-opening-acc-bob-cny"),
            FakeServicerContext(),
        )
    )
    assert (opening.from_account, opening.amount_minor) == ("acc-bank-equity", 500_000)
    assert not opening.HasField("risk")
    assert opening.idempotency_key == ""


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "code", "details"),
    [
        (
            lambda s, c: s.CreateTransfer(create_request(amount_minor=0), c),
            grpc.StatusCode.INVALID_ARGUMENT,
            "amount_minor must be between 1 and 10000000000000 (got 0)",
        ),
        (
            lambda s, c: s.CreateTransfer(create_request(currency="EUR"), c),
            grpc.StatusCode.INVALID_ARGUMENT,
            "currency 'EUR' is not supported (supported: CNY)",
        ),
        (
            lambda s, c: s.CreateTransfer(
                create_request(from_account="acc-bob-cny", to_account="acc-alice-cny"), c
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "account acc-bob-cny does not belong to customer alice",
        ),
        (
            lambda s, c: s.CreateTransfer(create_request(to_account="acc-nobody"), c),
            grpc.StatusCode.NOT_FOUND,
            "account acc-nobody not found",
        ),
        (
            lambda s, c: s.GetAccount(
                pb.GetAccountRequest(customer="bob", account_id="acc-alice-cny"), c
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "account acc-alice-cny does not belong to customer bob",
        ),
        (
            lambda s, c: s.GetAccount(pb.GetAccountRequest(customer="bob", account_id="nope"), c),
            grpc.StatusCode.NOT_FOUND,
            "account nope not found",
        ),
        (
            lambda s, c: s.ListTransactions(
                pb.ListTransactionsRequest(
                    customer="alice", account_id="acc-alice-cny", from_date="01/05/2024"
                ),
                c,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "from_date '01/05/2024' is not a date of the form YYYY-MM-DD",
        ),
        (
            lambda s, c: s.GetTransfer(
                pb.GetTransferRequest(customer="alice", transfer_id="tr-opening-acc-bob-cny"), c
            ),
            grpc.StatusCode.NOT_FOUND,
            "transfer tr-opening-acc-bob-cny not found",
        ),
    ],
)
def test_domain_errors_become_statuses(
    service: TransferEngineService, call: Call, code: grpc.StatusCode, details: str
) -> None:
    aborted = refusal(service, call)
    assert (aborted.code, aborted.details) == (code, details)


def test_key_reuse_is_already_exists(service: TransferEngineService) -> None:
    create(service)
    aborted = refusal(service, lambda s, c: s.CreateTransfer(create_request(amount_minor=1), c))
    assert aborted.code == grpc.StatusCode.ALREADY_EXISTS
    assert aborted.details == "idempotency key 'key-1' was already used for another request"


def test_risk_down_is_unavailable(service: TransferEngineService, risk: FakeRisk) -> None:
    risk.unavailable = True
    aborted = refusal(service, EVERY_METHOD["CreateTransfer"])
    assert (aborted.code, aborted.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "risk service unavailable",
    )
    # Tagged, so that the gateway's breaker to the engine does not count risk's outage.
    assert aborted.trailing_metadata == (("ztbank-dependency-unavailable", "risk"),)


def test_a_failed_ledger_storage_is_unavailable_with_its_cause(
    service: TransferEngineService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def full(_request: object) -> NoReturn:
        raise errors.LedgerStorageError("the ledger's storage failed: database or disk is full")

    monkeypatch.setattr(service._ledger, "create_transfer", full)
    aborted = refusal(service, EVERY_METHOD["CreateTransfer"])
    assert (aborted.code, aborted.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "the ledger's storage failed: database or disk is full",
    )
    # Tagged: the engine itself answered, and the gateway may pass the cause on.
    assert aborted.trailing_metadata == (("ztbank-dependency-unavailable", "ledger-store"),)


def test_an_open_breaker_to_risk_pushes_back_for_its_cool_down(
    service: TransferEngineService, risk: FakeRisk
) -> None:
    risk.unavailable, risk.retry_after_seconds = True, 7
    aborted = refusal(service, EVERY_METHOD["CreateTransfer"])
    assert aborted.code == grpc.StatusCode.UNAVAILABLE
    assert aborted.trailing_metadata == (
        ("ztbank-dependency-unavailable", "risk"),
        ("grpc-retry-pushback-ms", "7000"),
    )


def _subclasses(cls: type[errors.TransferEngineError]) -> Iterator[type[Exception]]:
    for subclass in cls.__subclasses__():
        yield subclass
        yield from _subclasses(subclass)


@pytest.mark.parametrize("error", list(_subclasses(errors.TransferEngineError)), ids=str)
def test_every_domain_error_has_a_status(error: type[errors.TransferEngineError]) -> None:
    assert servicer._status_of(error("x")) not in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    )
