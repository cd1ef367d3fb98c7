"""A customer's view of the ledger: only their own accounts (the engine checks ownership on every
call; its refusals are worded here so that they reveal nothing), and every answer checked
against the question."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

from services.common.money import InvalidAmountError, UnsupportedCurrencyError, parse_amount
from services.gateway.domain.ledger import (
    Account,
    Transaction,
    Transfer,
    TransferEngine,
    TransferOrder,
)
from services.gateway.errors import (
    BadRequestError,
    ConflictError,
    EngineError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)

MAX_IDEMPOTENCY_KEY_LENGTH = 128
# Visible ASCII only: the key is stored and compared by the engine, and invisible or non-ASCII
# characters would let two keys look alike.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]+")


def check_idempotency_key(key: str | None) -> str:
    if not key:
        raise BadRequestError("an Idempotency-Key header is required for transfers")
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise BadRequestError(
            f"the Idempotency-Key header is longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequestError("the Idempotency-Key header must be visible ASCII characters")
    return key


@contextmanager
def _not_yours(account_id: str) -> Iterator[None]:
    """The engine's "not found" and "not the owner" become one 403: a customer learns nothing
    about other customers' account IDs."""
    try:
        yield
    except (NotFoundError, PermissionDeniedError):
        raise PermissionDeniedError(f"account {account_id!r} is not one of your accounts") from None


class Banking:
    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine

    async def accounts(self, customer: str) -> list[Account]:
        accounts = await self._engine.list_accounts(customer)
        if any(account.customer != customer for account in accounts):
            raise EngineError("the transfer-engine listed an account of another customer")
        return accounts

    async def account(self, customer: str, account_id: str) -> Account:
        # One engine call: the engine checks ownership itself; its two refusals read alike here.
        with _not_yours(account_id):
            account = await self._engine.get_account(customer, account_id)
        if account.customer != customer or account.id != account_id:
            raise EngineError("the transfer-engine answered with another account")
        return account

    async def transactions(
        self, customer: str, account_id: str, from_date: date | None
    ) -> list[Transaction]:
        with _not_yours(account_id):
            transactions = await self._engine.list_transactions(customer, account_id, from_date)
        if any(transaction.account_id != account_id for transaction in transactions):
            raise EngineError("the transfer-engine listed transactions of another account")
        return transactions

    async def transfer(self, customer: str, transfer_id: str) -> Transfer:
        transfer = await self._engine.get_transfer(customer, transfer_id)
        if transfer.id != transfer_id:
            raise EngineError("the transfer-engine answered with another transfer")
        if transfer.customer != customer:
            raise PermissionDeniedError(f"transfer {transfer_id!r} is not one of your transfers")
        return transfer

    async def create_transfer(
        self,
        customer: str,
        idempotency_key: str | None,
        *,
        from_account: str,
        to_account: str,
        amount: str,
        currency: str,
    ) -> Transfer:
        """Ask the engine to move ``amount`` (a decimal string); any outcome is a ``Transfer``."""
        key = check_idempotency_key(idempotency_key)
        try:
            amount_minor = parse_amount(amount, currency)
        except (InvalidAmountError, UnsupportedCurrencyError) as error:
            raise InvalidRequestError(str(error)) from None
        if from_account == to_account:
            raise InvalidRequestError("from_account and to_account must differ")
        order = TransferOrder(from_account, to_account, amount_minor, currency)
        # One engine call: the engine refuses a source that is not the customer's (missing or
        # someone else's alike), an unknown destination, and a currency either account lacks.
        try:
            transfer = await self._engine.create_transfer(customer, key, order)
        except PermissionDeniedError:
            raise PermissionDeniedError(
                f"account {from_account!r} is not one of your accounts"
            ) from None
        if not transfer.carries_out(customer, order):
            # Engines compare the body of a replayed key too; this is the second line.
            if transfer.replayed:
                raise ConflictError(
                    "this Idempotency-Key was already used for a different transfer"
                )
            raise EngineError("the transfer-engine executed a different transfer")
        return transfer
