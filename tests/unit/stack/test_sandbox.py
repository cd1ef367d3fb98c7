import json
from pathlib import Path

from services.common.runtime.health import HealthSocket, ServiceHealth, health_socket
from services.issuer.settings import parse_listen_address
from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, sandbox_settings


def test_sandbox_gives_the_issuer_http_endpoint_its_own_free_port(tmp_path: Path) -> None:
    settings = sandbox_settings(tmp_path)
    host, port = parse_listen_address(settings.issuer_http)
    assert host == "127.0.0.1"
    registry = json.loads(settings.registry.read_text())
    service_ports = {
        entry[key]
        for entry in registry["services"].values()
        for key in ("port", "metrics_port")
        if entry.get(key) is not None
    }
    assert service_ports
    assert port not in service_ports
    # Every process of the stack is told where the issuer publishes revocation.
    assert NativeStack(settings).env["ZTBANK_ISSUER_HTTP"] == settings.issuer_http


def test_each_sandbox_edits_its_own_policy_and_trust_table(tmp_path: Path) -> None:
    first, second = sandbox_settings(tmp_path / "a"), sandbox_settings(tmp_path / "b")
    for settings in (first, second):
        assert settings.policy.read_bytes() == (REPO_ROOT / "infra" / "policy.json").read_bytes()
        assert settings.policy.is_relative_to(settings.home.parent)
        assert settings.trust_levels.is_relative_to(settings.home.parent)
    assert first.policy != second.policy
    assert first.trust_levels != second.trust_levels


def test_up_names_a_services_own_reason_for_not_being_ready(tmp_path: Path) -> None:
    stack = NativeStack(sandbox_settings(tmp_path))
    assert stack._not_ready("risk") == (
        f"no answer on {health_socket(stack.settings.home, 'risk')}: No such file or directory"
    )
    health = ServiceHealth("risk")
    health.require("revocation", lambda: "failing closed: no CRL verified yet from http://x")
    served = HealthSocket(health_socket(stack.settings.home, "risk"), health)
    try:
        assert (
            stack._not_ready("risk")
            == "not ready: failing closed: no CRL verified yet from http://x"
        )
    finally:
        served.close()
