import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest

from services.common.risk_decision import RiskDecision as Decision
from services.transfer_engine.domain.ledger import Ledger, LedgerRepository
from services.transfer_engine.domain.model import (
    MAX_AMOUNT_MINOR,
    AccountKind,
    RejectionReason,
    Transfer,
    TransferRequest,
    TransferStatus,
)
from services.transfer_engine.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    NotOwnerError,
    RiskUnavailableError,
)
from tests.unit.transfer_engine.fakes import FakeClock, FakeRisk
from tests.unit.transfer_engine.support import (
    ALICE_CNY,
    ALICE_SAVINGS,
    BOB_CNY,
    EQUITY,
    SEEDED,
    balances,
    posting_count,
    postings_of,
    transfer_request,
)

DAY = timedelta(days=1)


def create(ledger: Ledger, request: TransferRequest) -> Transfer:
    return asyncio.run(ledger.create_transfer(request))


# -- seed -----------------------------------------------------------------------------------


def test_seed_opens_accounts_with_real_postings_that_sum_to_zero(
    ledger: Ledger, repository: LedgerRepository
) -> None:
    assert balances(repository) == SEEDED
    assert sum(balances(repository).values()) == 0
    assert [(a.id, a.name, a.currency, a.kind) for a in ledger.accounts("alice")] == [
        (ALICE_CNY, "Alice current", "CNY", AccountKind.CUSTOMER),
        (ALICE_SAVINGS, "Alice savings", "CNY", AccountKind.CUSTOMER),
    ]
    [opening] = ledger.transactions("bob", BOB_CNY, "")
    assert (opening.amount_minor, opening.counterparty_account) == (500_000, EQUITY)
    assert opening.balance_after_minor == 500_000
    assert ledger.transfer("bob", opening.transfer_id).status is TransferStatus.POSTED


def test_seed_is_idempotent(ledger: Ledger, repository: LedgerRepository) -> None:
    ledger.ensure_seeded()
    ledger.ensure_seeded()
    assert balances(repository) == SEEDED
    assert posting_count(repository) == 6


# -- posting --------------------------------------------------------------------------------


def test_allowed_transfer_moves_money_with_two_postings_summing_to_zero(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    transfer = create(ledger, transfer_request())
    assert transfer.status is TransferStatus.POSTED
    assert not transfer.replayed
    assert transfer.assessment == risk.answer
    assert postings_of(repository, transfer) == {ALICE_CNY: -12_345, BOB_CNY: 12_345}
    assert balances(repository)[ALICE_CNY] == 1_000_000 - 12_345
    assert balances(repository)[BOB_CNY] == 500_000 + 12_345
    assert sum(balances(repository).values()) == 0
    [latest, _] = ledger.transactions("alice", ALICE_CNY, "")
    assert (latest.transfer_id, latest.counterparty_account) == (transfer.id, BOB_CNY)
    assert latest.balance_after_minor == 1_000_000 - 12_345
    # Risk saw the transfer's id before it existed, so its decision can be traced to it.
    [(asked, transfer_id)] = risk.calls
    assert (asked, transfer_id) == (transfer_request(), transfer.id)


def test_money_may_go_to_another_customers_account_but_not_from_it(ledger: Ledger) -> None:
    assert create(ledger, transfer_request()).status is TransferStatus.POSTED
    with pytest.raises(
        NotOwnerError, match="account acc-bob-cny does not belong to customer alice"
    ):
        create(
            ledger,
            transfer_request(idempotency_key="key-2", from_account=BOB_CNY, to_account=ALICE_CNY),
        )


# -- idempotency ----------------------------------------------------------------------------


def test_replay_returns_the_first_answer_and_posts_nothing(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    first = create(ledger, transfer_request())
    after_first = balances(repository)
    replay = create(ledger, transfer_request())
    assert replay == replace(first, replayed=True)
    assert balances(repository) == after_first
    assert posting_count(repository) == 8
    assert len(risk.calls) == 1


def test_replay_works_while_risk_is_down(ledger: Ledger, risk: FakeRisk) -> None:
    first = create(ledger, transfer_request())
    risk.unavailable = True
    assert create(ledger, transfer_request()).id == first.id


@pytest.mark.parametrize(
    "change",
    [
        {"amount_minor": 12_346},
        {"to_account": ALICE_SAVINGS},
        {"from_account": ALICE_SAVINGS},
    ],
)
def test_reusing_a_key_for_another_request_is_refused(
    ledger: Ledger, repository: LedgerRepository, change: dict[str, object]
) -> None:
    create(ledger, transfer_request())
    before = balances(repository)
    with pytest.raises(IdempotencyConflictError, match="was already used for another request"):
        create(ledger, transfer_request(**change))
    assert balances(repository) == before


def test_keys_are_per_customer(ledger: Ledger) -> None:
    alices = create(ledger, transfer_request())
    bobs = create(
        ledger, transfer_request(customer="bob", from_account=BOB_CNY, to_account=ALICE_CNY)
    )
    assert bobs.id != alices.id
    assert not bobs.replayed


# -- insufficient funds, review, deny, risk down --------------------------------------------


def test_insufficient_funds_is_stored_as_rejected_and_replayed_as_such(
    ledger: Ledger, repository: LedgerRepository
) -> None:
    too_much = transfer_request(from_account=ALICE_SAVINGS, amount_minor=250_001)
    rejected = create(ledger, too_much)
    assert rejected.status is TransferStatus.REJECTED
    assert rejected.rejection_reason is RejectionReason.INSUFFICIENT_FUNDS
    assert balances(repository) == SEEDED
    assert postings_of(repository, rejected) == {}
    # Money arriving later does not change the stored answer to that request.
    create(ledger, transfer_request(idempotency_key="top-up", to_account=ALICE_SAVINGS))
    assert create(ledger, too_much) == replace(rejected, replayed=True)


def test_the_whole_balance_may_be_sent(ledger: Ledger, repository: LedgerRepository) -> None:
    everything = transfer_request(from_account=ALICE_SAVINGS, amount_minor=250_000)
    assert create(ledger, everything).status is TransferStatus.POSTED
    assert balances(repository)[ALICE_SAVINGS] == 0


def test_review_holds_the_transfer_without_postings(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    risk.answer_with(Decision.REVIEW, "amount_above_review_threshold", score=60)
    held = create(ledger, transfer_request())
    assert held.status is TransferStatus.REVIEW
    assert held.rejection_reason is None
    assert held.assessment == risk.answer
    assert postings_of(repository, held) == {}
    assert balances(repository) == SEEDED
    assert ledger.transfer("alice", held.id) == held


def test_deny_rejects_with_the_risk_reasons_and_no_postings(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    risk.answer_with(Decision.DENY, "blocklisted_account", "velocity", score=95)
    denied = create(ledger, transfer_request())
    assert denied.status is TransferStatus.REJECTED
    assert denied.rejection_reason is RejectionReason.RISK_DENIED
    assert denied.assessment is not None
    assert denied.assessment.reasons == ("blocklisted_account", "velocity")
    assert postings_of(repository, denied) == {}
    assert balances(repository) == SEEDED


def test_risk_unavailable_stores_nothing_so_a_retry_can_succeed(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    risk.unavailable = True
    with pytest.raises(RiskUnavailableError, match="risk service unavailable"):
        create(ledger, transfer_request())
    assert repository.transfer_by_key("alice", "key-1") is None
    assert balances(repository) == SEEDED
    risk.unavailable = False
    retried = create(ledger, transfer_request())
    assert (retried.status, retried.replayed) == (TransferStatus.POSTED, False)


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"customer": ""}, "customer is required"),
        ({"idempotency_key": ""}, "idempotency_key is required"),
        ({"idempotency_key": "k" * 129}, "idempotency_key must be 1..128 printable"),
        ({"idempotency_key": "line\nbreak"}, "printable ASCII"),
        ({"idempotency_key": "clé"}, "printable ASCII"),
        ({"from_account": ""}, "from_account is required"),
        ({"to_account": ""}, "to_account is required"),
        ({"to_account": ALICE_CNY}, "from_account and to_account must differ"),
        ({"amount_minor": 0}, "amount_minor must be between 1 and 10000000000000"),
        ({"amount_minor": -100}, "amount_minor must be between"),
        ({"amount_minor": MAX_AMOUNT_MINOR + 1}, "amount_minor must be between"),
        ({"currency": "USD"}, "currency 'USD' is not supported"),
        ({"currency": ""}, "currency '' is not supported"),
        ({"to_account": EQUITY}, "account acc-bank-equity does not take transfers"),
    ],
)
def test_invalid_requests_are_refused_before_risk_is_asked(
    ledger: Ledger, risk: FakeRisk, change: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        create(ledger, transfer_request(**change))
    assert risk.calls == []


def test_longest_key_and_largest_amount_are_accepted(ledger: Ledger) -> None:
    transfer = create(
        ledger, transfer_request(idempotency_key="k" * 128, amount_minor=MAX_AMOUNT_MINOR)
    )
    assert transfer.rejection_reason is RejectionReason.INSUFFICIENT_FUNDS


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"from_account": "acc-nobody"}, NotOwnerError, "acc-nobody does not belong to"),
        ({"to_account": "acc-nobody"}, NotFoundError, "account acc-nobody not found"),
        ({"from_account": BOB_CNY, "to_account": ALICE_CNY}, NotOwnerError, "does not belong"),
        ({"from_account": EQUITY}, NotOwnerError, "does not belong"),
    ],
)
def test_accounts_must_exist_and_the_source_must_be_the_customers(
    ledger: Ledger,
    risk: FakeRisk,
    change: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        create(ledger, transfer_request(**change))
    assert risk.calls == []


# -- reads ----------------------------------------------------------------------------------


def test_account_reads_are_limited_to_the_owner(ledger: Ledger) -> None:
    assert ledger.account("alice", ALICE_CNY).balance_minor == 1_000_000
    assert ledger.accounts("mallory") == []
    with pytest.raises(
        NotOwnerError, match="account acc-bob-cny does not belong to customer alice"
    ):
        ledger.account("alice", BOB_CNY)
    with pytest.raises(NotOwnerError):
        ledger.transactions("alice", BOB_CNY, "")
    with pytest.raises(NotFoundError, match="account acc-nobody not found"):
        ledger.account("alice", "acc-nobody")
    with pytest.raises(InvalidRequestError, match="customer is required"):
        ledger.accounts("")


def test_someone_elses_transfer_reads_like_a_missing_one(ledger: Ledger) -> None:
    transfer = create(ledger, transfer_request())
    assert ledger.transfer("alice", transfer.id) == transfer
    with pytest.raises(NotFoundError) as of_someone_else:
        ledger.transfer("bob", transfer.id)
    with pytest.raises(NotFoundError) as missing:
        ledger.transfer("bob", "tr-missing")
    assert str(of_someone_else.value) == str(missing.value).replace("tr-missing", transfer.id)


def test_transactions_newest_first_and_filtered_by_day(ledger: Ledger, clock: FakeClock) -> None:
    clock.advance(2 * DAY)  # 2024-05-03
    first = create(ledger, transfer_request(amount_minor=100))
    clock.advance(2 * DAY)  # 2024-05-05
    second = create(ledger, transfer_request(idempotency_key="key-2", amount_minor=200))

    everything = ledger.transactions("alice", ALICE_CNY, "")
    assert [(t.transfer_id, t.amount_minor, t.balance_after_minor) for t in everything] == [
        (second.id, -200, 999_700),
        (first.id, -100, 999_900),
        ("tr-opening-acc-alice-cny", 1_000_000, 1_000_000),
    ]
    assert [t.transfer_id for t in ledger.transactions("alice", ALICE_CNY, "2024-05-03")] == [
        second.id,
        first.id,
    ]
    assert [t.transfer_id for t in ledger.transactions("alice", ALICE_CNY, "2024-05-04")] == [
        second.id
    ]
    assert ledger.transactions("alice", ALICE_CNY, "2024-05-06") == []
    [received] = ledger.transactions("bob", BOB_CNY, "2024-05-05")
    assert (received.amount_minor, received.counterparty_account) == (200, ALICE_CNY)


@pytest.mark.parametrize("text", ["2024-5-3", "20240503", "2024-02-30", "yesterday", "2024-W18-5"])
def test_invalid_from_date_is_refused(ledger: Ledger, text: str) -> None:
    with pytest.raises(InvalidRequestError, match="is not a date of the form YYYY-MM-DD"):
        ledger.transactions("alice", ALICE_CNY, text)


# -- concurrency ----------------------------------------------------------------------------


def test_concurrent_transfers_never_overdraw(ledger: Ledger, repository: LedgerRepository) -> None:
    # All on one event loop, as the server runs them; their writes run in worker threads at once.
    async def send_all() -> list[Transfer]:
        return await asyncio.gather(
            *(
                ledger.create_transfer(
                    transfer_request(idempotency_key=f"key-{number}", amount_minor=100_000)
                )
                for number in range(20)
            )
        )

    transfers = asyncio.run(send_all())

    statuses = [t.status for t in transfers]
    assert statuses.count(TransferStatus.POSTED) == 10
    assert statuses.count(TransferStatus.REJECTED) == 10
    assert {t.rejection_reason for t in transfers if t.status is TransferStatus.REJECTED} == {
        RejectionReason.INSUFFICIENT_FUNDS
    }
    assert balances(repository)[ALICE_CNY] == 0
    assert balances(repository)[BOB_CNY] == 1_500_000
    assert sum(balances(repository).values()) == 0
    assert posting_count(repository) == 6 + 2 * 10


def test_concurrent_duplicates_post_once(
    ledger: Ledger, repository: LedgerRepository, risk: FakeRisk
) -> None:
    racers = 8
    # Every racer has passed the replay check and is waiting on risk before any of them writes.
    risk.before_answer = asyncio.Barrier(racers)

    async def race() -> list[Transfer]:
        return await asyncio.gather(
            *(ledger.create_transfer(transfer_request()) for _ in range(racers))
        )

    answers = asyncio.run(race())

    assert len(risk.calls) == racers
    assert len({a.id for a in answers}) == 1
    assert sorted(a.replayed for a in answers) == [False] + [True] * (racers - 1)
    assert balances(repository)[ALICE_CNY] == 1_000_000 - 12_345
    assert posting_count(repository) == 8
