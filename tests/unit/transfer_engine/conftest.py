from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.transfer_engine.adapters.sqlite_ledger import SqliteLedgerRepository
from services.transfer_engine.domain.ledger import Ledger, LedgerRepository
from tests.unit.transfer_engine.fakes import FakeClock, FakeRisk, InMemoryLedgerRepository

OPENED_AT = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(OPENED_AT)


@pytest.fixture
def risk() -> FakeRisk:
    return FakeRisk()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "transfer-engine" / "ledger.db"


# Domain tests run against both repositories, which also keeps the fake honest.
@pytest.fixture(params=["sqlite", "memory"])
def repository(request: pytest.FixtureRequest, ledger_path: Path) -> LedgerRepository:
    if request.param == "sqlite":
        return SqliteLedgerRepository(ledger_path)
    return InMemoryLedgerRepository()


@pytest.fixture
def ledger(repository: LedgerRepository, risk: FakeRisk, clock: FakeClock) -> Ledger:
    ledger = Ledger(repository=repository, risk=risk, clock=clock)
    ledger.ensure_seeded()
    return ledger
