"""The demo bank's customers and opening balances, posted once from the bank's equity account."""

from __future__ import annotations

from dataclasses import dataclass

BANK_EQUITY_ACCOUNT = "acc-bank-equity"
BANK_EQUITY_NAME = "Bank equity"
SEED_CURRENCY = "CNY"


@dataclass(frozen=True)
class OpeningAccount:
    id: str
    customer: str
    name: str
    opening_balance_minor: int


DEMO_ACCOUNTS = (
    OpeningAccount("acc-alice-cny", "alice", "Alice current", 1_000_000),
    OpeningAccount("acc-alice-savings", "alice", "Alice savings", 250_000),
    OpeningAccount("acc-bob-cny", "bob", "Bob current", 500_000),
)


def opening_transfer_id(account_id: str) -> str:
    return f"tr-opening-{account_id}"
