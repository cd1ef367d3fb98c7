"""Requests and ledger-wide views shared by the transfer-engine tests."""

from dataclasses import replace

from services.transfer_engine.domain.ledger import LedgerRepository
from services.transfer_engine.domain.model import Transfer, TransferRequest

ALICE_CNY, ALICE_SAVINGS, BOB_CNY, EQUITY = (
    "acc-alice-cny",
    "acc-alice-savings",
    "acc-bob-cny",
    "acc-bank-equity",
)
ALL_ACCOUNTS = (ALICE_CNY, ALICE_SAVINGS, BOB_CNY, EQUITY)


def transfer_request(**changes: object) -> TransferRequest:
    request = TransferRequest(
        customer="alice",
        idempotency_key="key-1",
        from_account=ALICE_CNY,
        to_account=BOB_CNY,
        amount_minor=12_345,
        currency="CNY",
    )
    return replace(request, **changes)  # type: ignore[arg-type]


def balances(repository: LedgerRepository) -> dict[str, int]:
    return {a: account.balance_minor for a in ALL_ACCOUNTS if (account := repository.account(a))}


def posting_count(repository: LedgerRepository) -> int:
    return sum(len(repository.transactions(a, since=None)) for a in ALL_ACCOUNTS)


def postings_of(repository: LedgerRepository, transfer: Transfer) -> dict[str, int]:
    return {
        t.account_id: t.amount_minor
        for account in ALL_ACCOUNTS
        for t in repository.transactions(account, since=None)
        if t.transfer_id == transfer.id
    }


SEEDED = {ALICE_CNY: 1_000_000, ALICE_SAVINGS: 250_000, BOB_CNY: 500_000, EQUITY: -1_750_000}
