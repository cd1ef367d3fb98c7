from pathlib import Path

import pytest

from services.common.settings import load_settings
from services.risk.settings import RiskSettings

pytestmark = pytest.mark.usefixtures("settings_environment")


def test_rules_default_to_the_repository_file(tmp_path: Path) -> None:
    settings = load_settings(RiskSettings)
    assert settings.risk_rules == tmp_path / "infra" / "risk" / "rules.json"
    assert settings.trust_domain == "ztbank.example"


def test_rules_path_comes_from_ztbank_risk_rules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZTBANK_RISK_RULES", "conf/risk.json")
    monkeypatch.setenv("ZTBANK_TRUST_DOMAIN", "bank.test")
    settings = load_settings(RiskSettings)
    assert settings.risk_rules == tmp_path / "conf" / "risk.json"
    assert settings.trust_domain == "bank.test"
