"""Who is a customer: whoever holds at least one account at the transfer-engine."""

from __future__ import annotations

from services.gateway.domain.ledger import TransferEngine
from services.gateway.errors import NotFoundError


class EngineCustomerDirectory:
    def __init__(self, engine: TransferEngine) -> None:
        self._engine = engine

    async def is_customer(self, customer: str) -> bool:
        try:
            return bool(await self._engine.list_accounts(customer))
        except NotFoundError:
            return False
