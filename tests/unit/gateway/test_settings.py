from datetime import timedelta
from pathlib import Path

import pytest

from services.common.settings import InvalidSettingsError, load_settings
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.usefixtures("settings_environment")


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(GatewaySettings)

    assert settings.token_ttl == timedelta(minutes=10)
    assert settings.engine_timeout == timedelta(seconds=5)
    assert settings.token_key_path == tmp_path / "var" / "gateway" / "token-signing.key"
    assert str(settings.gateway_id) == (
        "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/gateway"
    )
    assert str(settings.teller_id) == (
        "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/teller"
    )


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTBANK_TOKEN_TTL", "15m")
    monkeypatch.setenv("ZTBANK_ENGINE_TIMEOUT", "750ms")
    monkeypatch.setenv("ZTBANK_TRUST_DOMAIN", "bank.test")

    settings = load_settings(GatewaySettings)

    assert settings.token_ttl == timedelta(minutes=15)
    assert settings.engine_timeout == timedelta(milliseconds=750)
    assert settings.teller_id.trust_domain == "bank.test"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ZTBANK_TOKEN_TTL", "16m", "between 30s and 15m (got 16m)"),
        ("ZTBANK_TOKEN_TTL", "1h", "between 30s and 15m"),
        ("ZTBANK_TOKEN_TTL", "10s", "between 30s and 15m"),
        ("ZTBANK_TOKEN_TTL", "600", "use a number and a unit"),
        ("ZTBANK_ENGINE_TIMEOUT", "2m", "ZTBANK_ENGINE_TIMEOUT"),
    ],
)
def test_refusals(monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(InvalidSettingsError, match="invalid setting") as caught:
        load_settings(GatewaySettings)

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
