"""compose.offline.yaml: the stack that runs where no registry answers (``make test-compose`` here).

Compose v1 cannot ``extends`` a service that has depends_on, so the offline file writes the ztbank
services out again; these tests fail when the two files drift apart in anything but what the
offline variant swaps (Vault, Consul, the collector and what hangs off it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.infra.test_compose import interpolated, read_env_file

ROOT = Path(__file__).resolve().parents[3]
OURS = ("issuer", "entries", "risk", "transfer-engine", "gateway", "locust", "e2e")
BANK = ("risk", "transfer-engine", "gateway")
UNPULLABLE = ("vault", "vault-bootstrap", "consul", "consul-seed", "otel-collector", "jaeger")
SWAPPED_ENV = {"CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "OTEL_EXPORTER_OTLP_ENDPOINT"}
SWAPPED_ENV |= {"OTEL_EXPORTER_OTLP_PROTOCOL", "ZTBANK_E2E_TRACES", "ZTBANK_E2E_JAEGER_URL"}


def load(name: str) -> dict[str, dict[str, Any]]:
    env = read_env_file(ROOT / ".env")
    document = interpolated(yaml.safe_load((ROOT / name).read_text()), env)
    services = document["services"]
    assert isinstance(services, dict)
    return services


@pytest.fixture(scope="module")
def full() -> dict[str, dict[str, Any]]:
    return load("compose.yaml")


@pytest.fixture(scope="module")
def offline() -> dict[str, dict[str, Any]]:
    return load("compose.offline.yaml")


def test_nothing_in_it_needs_a_registry(offline: dict[str, dict[str, Any]]) -> None:
    assert not set(offline) & {*UNPULLABLE, "grafana", "healthcheck-bin"}
    env = read_env_file(ROOT / ".env")
    built_here = {env[k] for k in ("ZTBANK_IMAGE", "ZTBANK_LOAD_IMAGE", "ZTBANK_TEST_IMAGE")}
    built_here.add(env["ZTBANK_PROMETHEUS_IMAGE"])
    for name, service in offline.items():
        assert service["image"] in built_here, name
        assert "build" in service, f"{name}: an image we own is built, never pulled"


@pytest.mark.parametrize("name", OURS)
def test_our_services_are_the_same_as_in_the_full_stack(
    name: str, full: dict[str, dict[str, Any]], offline: dict[str, dict[str, Any]]
) -> None:
    ours, theirs = offline[name], full[name]
    for key in ("image", "user", "healthcheck", "restart", "profiles", "command", "ports"):
        if key == "command" and name == "issuer":
            continue
        assert ours.get(key) == theirs.get(key), f"{name}: {key} differs"
    assert ours["build"]["target"] == theirs["build"]["target"]
    if name != "issuer":  # the issuer's entrypoint reads Vault's AppRole in the full stack
        assert ours.get("entrypoint") == theirs.get("entrypoint"), name
    full_env = {k: v for k, v in theirs.get("environment", {}).items() if k not in SWAPPED_ENV}
    offline_env = ours.get("environment", {})
    for key, value in full_env.items():
        if name == "issuer" and key in ("ZTBANK_UPSTREAM", "VAULT_ADDR", "ZTBANK_APPROLE_FILE"):
            continue
        assert offline_env.get(key) == value, f"{name}: {key}"
    full_volumes = {v for v in theirs.get("volumes", []) if not v.startswith("vault-")}
    assert full_volumes <= set(ours.get("volumes", [])), name


def test_offline_services_use_the_file_registry_local_telemetry_and_the_disk_upstream(
    offline: dict[str, dict[str, Any]],
) -> None:
    for name in BANK:
        assert not set(offline[name]["environment"]) & SWAPPED_ENV, name
    issuer = offline["issuer"]
    assert issuer["environment"]["ZTBANK_UPSTREAM"] == "disk"
    assert "ca:/var/lib/ztbank/certs:ro" in issuer["volumes"]
    assert issuer["depends_on"] == {"ca-init": {"condition": "service_completed_successfully"}}
    assert offline["ca-init"]["entrypoint"] == ["ztbank", "certs", "init"]
    assert offline["e2e"]["environment"]["ZTBANK_E2E_TRACES"] == "files"


def test_prometheus_scrapes_each_service_on_its_registered_metrics_port(
    offline: dict[str, dict[str, Any]],
) -> None:
    registry = json.loads((ROOT / "infra/consul/services.json").read_text())["services"]
    mount = offline["prometheus"]["volumes"][0]
    source = mount.split(":")[0]
    assert source == "./infra/prometheus/prometheus.offline.yml"
    config = yaml.safe_load((ROOT / source).read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    for name in BANK:
        assert f"{name}:{registry[name]['metrics_port']}" in targets, name
    dockerfile = (ROOT / "infra/prometheus/Dockerfile").read_text()
    assert "apt-get install" in dockerfile
    assert "prometheus" in dockerfile
    assert "USER prometheus" in dockerfile
