import asyncio
import stat
from pathlib import Path

import grpc
import pytest

from services._proto import ledger_pb2 as pb
from services.common.identity.workloads import GATEWAY
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.settings import InvalidSettingsError, load_settings
from services.transfer_engine.factory import build_transfer_engine_service
from services.transfer_engine.settings import TransferEngineSettings
from tests.support.breakers import closed_breaker
from tests.support.grpc_context import FakeServicerContext

pytestmark = pytest.mark.usefixtures("settings_environment")


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(TransferEngineSettings)
    assert settings.risk_timeout_seconds == 2.0
    assert settings.ledger_path == tmp_path / "var" / "transfer-engine" / "ledger.db"


def test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZTBANK_RISK_TIMEOUT_SECONDS", "0.5")
    settings = load_settings(TransferEngineSettings)
    assert settings.risk_timeout_seconds == 0.5
    assert settings.ledger_path == tmp_path / "home" / "transfer-engine" / "ledger.db"


@pytest.mark.parametrize("value", ["0", "-1", "31", "soon", "nan"])
def test_invalid_risk_timeout(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("ZTBANK_RISK_TIMEOUT_SECONDS", value)
    with pytest.raises(InvalidSettingsError, match="ZTBANK_RISK_TIMEOUT_SECONDS"):
        load_settings(TransferEngineSettings)


def test_factory_opens_and_seeds_the_ledger_without_calling_risk(tmp_path: Path) -> None:
    settings = load_settings(TransferEngineSettings, home=tmp_path)

    def no_channel_yet() -> grpc.aio.Channel:
        raise AssertionError("risk is asked only when a transfer is made")

    service = build_transfer_engine_service(settings, no_channel_yet, closed_breaker("risk"))
    assert stat.S_IMODE(settings.state_dir.stat().st_mode) == 0o700
    gateway = PeerIdentity(GATEWAY.spiffe_id(settings.trust_domain), "0a", "ff" * 32, "")
    token = set_current_peer(gateway)
    try:
        reply = asyncio.run(
            service.ListAccounts(pb.ListAccountsRequest(customer="bob"), FakeServicerContext())
        )
        accounts = reply.accounts
    finally:
        reset_current_peer(token)
    assert [(a.id, a.balance_minor) for a in accounts] == [("acc-bob-cny", 500_000)]
