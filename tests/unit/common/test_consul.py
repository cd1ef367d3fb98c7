"""The Consul client at its HTTP boundary (requests_mock): registration, discovery of passing
instances, the policy in KV watched with blocking queries, staleness and failing closed."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests_mock as rm

from services.common.authz import policy as policy_module
from services.common.authz.policy import FilePolicySource, Policy, PolicyError
from services.common.discovery.consul.client import (
    ConsulAuthError,
    ConsulCheck,
    ConsulClient,
    ConsulError,
    base_url,
)
from services.common.discovery.consul.policy_source import ConsulPolicySource
from services.common.discovery.consul.registration import ConsulRegistration
from services.common.discovery.consul.registry import ConsulRegistry
from services.common.discovery.consul.settings import ConsulSettings
from services.common.discovery.registry import (
    FileRegistry,
    RegistryError,
    ServiceAddress,
    write_registry,
)
from services.common.identity.spiffe_id import SpiffeId
from services.common.runtime import service as runtime_module
from services.common.runtime.service import ServiceSettings, create_runtime
from services.common.settings import InvalidSettingsError, load_settings
from tests.support.helpers import wait_until

CONSUL = "http://consul.test:8500"
TOKEN = "s3cr3t-token"
KEY = "ztbank/policy"
KV_URL = f"{CONSUL}/v1/kv/{KEY}"
TD = "ztbank.example"
TE_ID = f"spiffe://{TD}/env/prod/zone/az1/team/payments/svc/transfer-engine"
GW_ID = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/gateway"
ASSESS = "/ztbank.risk.v1.Risk/Assess"


@pytest.fixture(autouse=True)
def _no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_CACERT", "CONSUL_HTTP_SSL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CONSUL_HTTP_SSL_VERIFY", raising=False)
    monkeypatch.setattr(policy_module, "RELOAD_CHECK_SECONDS", 0.0)


@pytest.fixture
def http() -> Iterator[rm.Mocker]:
    with rm.Mocker() as mocker:
        yield mocker


@pytest.fixture
def client() -> ConsulClient:
    return ConsulClient(CONSUL, token=TOKEN)


def last(http: rm.Mocker) -> Any:
    request = http.last_request
    assert request is not None
    return request


def policy_text(*callers: str) -> str:
    return json.dumps({"rules": [{"service": "risk", "methods": [ASSESS], "callers": [*callers]}]})


def kv_body(text: str | None, modify_index: int) -> list[dict[str, Any]]:
    value = base64.b64encode(text.encode()).decode() if text is not None else None
    return [{"Key": KEY, "Value": value, "ModifyIndex": modify_index, "Flags": 0}]


def kv_answer(text: str, index: int) -> dict[str, Any]:
    return {"json": kv_body(text, index), "headers": {"X-Consul-Index": str(index)}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def allowed(policy: Policy, caller: str = TE_ID) -> bool:
    return policy.decide("risk", ASSESS, SpiffeId.parse(caller)).allowed


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "ssl", "expected"),
    [
        ("127.0.0.1:8500", False, "http://127.0.0.1:8500"),
        ("consul:8501", True, "https://consul:8501"),
        ("https://consul:8501/", False, "https://consul:8501"),
        ("http://consul:8500", True, "http://consul:8500"),
    ],
)
def test_address_forms(address: str, ssl: bool, expected: str) -> None:
    assert base_url(address, ssl=ssl) == expected


@pytest.mark.parametrize("address", ["unix:///tmp/consul.sock", "ftp://consul", "http://"])
def test_unsupported_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConsulError, match="only http"):
        ConsulClient(address)


def test_settings_come_from_consuls_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not load_settings(ConsulSettings).enabled
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "consul:8501")
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    monkeypatch.setenv("CONSUL_CACERT", "/etc/consul/ca.pem")
    settings = load_settings(ConsulSettings)
    assert settings.enabled
    assert TOKEN not in repr(settings)
    assert settings.client().base_url == "https://consul:8501"
    assert settings.policy_key == KEY
    assert settings.advertised("10.1.2.3") == "10.1.2.3"
    assert settings.advertised("0.0.0.0") not in ("", "0.0.0.0")


def test_tls_verification_cannot_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "https://consul:8501")
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    with pytest.raises(InvalidSettingsError, match="never disables TLS verification"):
        load_settings(ConsulSettings)


def test_staleness_must_outlast_a_blocking_query(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZTBANK_CONSUL_WATCH_WAIT_SECONDS", "30")
    monkeypatch.setenv("ZTBANK_CONSUL_POLICY_MAX_STALENESS_SECONDS", "45")
    with pytest.raises(InvalidSettingsError, match="at least twice"):
        load_settings(ConsulSettings)


def test_ca_bundle_is_used_and_verification_is_never_off(http: rm.Mocker) -> None:
    http.get(f"{CONSUL}/v1/health/service/risk", json=[])
    with pytest.raises(RegistryError):
        ConsulRegistry(ConsulClient(CONSUL, ca_cert="/etc/consul/ca.pem")).lookup("risk")
    with pytest.raises(RegistryError):
        ConsulRegistry(ConsulClient(CONSUL)).lookup("risk")
    with_ca, default = (r.verify for r in http.request_history)
    assert with_ca == "/etc/consul/ca.pem"
    assert default not in (False, None, "")  # True, or requests' own CA bundle


# -- registration ----------------------------------------------------------------------------


def test_registration_payload_and_token_header(http: rm.Mocker, client: ConsulClient) -> None:
    http.put(f"{CONSUL}/v1/agent/service/register", status_code=200)
    service_id = client.register_service(
        "risk", "risk.internal", 50052, ConsulCheck(tcp="risk.internal:50052")
    )
    assert service_id == "risk-risk.internal-50052"
    request = last(http)
    assert request.method == "PUT"
    assert request.headers["X-Consul-Token"] == TOKEN
    assert request.json() == {
        "ID": "risk-risk.internal-50052",
        "Name": "risk",
        "Address": "risk.internal",
        "Port": 50052,
        "Tags": ["ztbank"],
        "Meta": {},
        "Check": {
            "TCP": "risk.internal:50052",
            "Interval": "5s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    }


def test_http_check_payload_keeps_tls_verification() -> None:
    check = ConsulCheck(http="https://risk:9103/metrics", interval="10s")
    assert check.payload() == {
        "HTTP": "https://risk:9103/metrics",
        "Method": "GET",
        "TLSSkipVerify": False,
        "Interval": "10s",
        "Timeout": "2s",
        "DeregisterCriticalServiceAfter": "1m",
    }


@pytest.mark.parametrize(
    "kwargs", [{}, {"tcp": "a:1", "http": "http://a:1/"}, {"http": "risk:9103/metrics"}]
)
def test_a_check_needs_exactly_one_valid_target(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="check"):
        ConsulCheck(**kwargs)


def test_runtime_registration_and_deregistration(http: rm.Mocker, client: ConsulClient) -> None:
    http.put(f"{CONSUL}/v1/agent/service/register")
    http.put(f"{CONSUL}/v1/agent/service/deregister/gateway-gw-8443")
    registration = ConsulRegistration.register(
        client,
        ServiceAddress("gateway", "0.0.0.0", 8443, 9101),
        "gw",
    )
    body = http.request_history[0].json()
    assert body["Meta"] == {"metrics_port": "9101"}
    assert body["Check"]["TCP"] == "gw:8443"
    registration.close()
    registration.close()  # once only
    assert http.call_count == 2
    assert last(http).headers["X-Consul-Token"] == TOKEN


def test_no_token_sends_no_header(http: rm.Mocker) -> None:
    http.put(f"{CONSUL}/v1/agent/service/deregister/risk-1")
    ConsulClient(CONSUL).deregister_service("risk-1")
    assert "X-Consul-Token" not in last(http).headers


def test_bad_token_is_a_clear_error(http: rm.Mocker, client: ConsulClient) -> None:
    http.put(f"{CONSUL}/v1/agent/service/register", status_code=403, text="Permission denied")
    with pytest.raises(ConsulAuthError) as caught:
        client.register_service("risk", "risk", 50052, ConsulCheck(tcp="risk:50052"))
    message = str(caught.value)
    assert "refused the ACL token in CONSUL_HTTP_TOKEN" in message
    assert "HTTP 403: Permission denied" in message
    assert "PUT /v1/agent/service/register" in message
    assert TOKEN not in message


# -- discovery -------------------------------------------------------------------------------


def health_entry(
    address: str,
    port: int,
    *statuses: str,
    node: str = "10.0.0.9",
    meta: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "Node": {"Node": "n1", "Address": node},
        "Service": {"ID": f"risk-{port}", "Service": "risk", "Address": address, "Port": port}
        | ({"Meta": meta} if meta is not None else {}),
        "Checks": [{"CheckID": f"c{i}", "Status": s} for i, s in enumerate(statuses)],
    }


def test_lookup_asks_for_passing_instances_and_takes_the_first(
    http: rm.Mocker, client: ConsulClient
) -> None:
    http.get(
        f"{CONSUL}/v1/health/service/risk",
        json=[
            health_entry("10.0.0.1", 7001, "passing", "critical"),  # never trusted
            health_entry("", 7002, "passing", "passing", meta={"metrics_port": "9103"}),
            health_entry("10.0.0.3", 7003, "passing"),
        ],
    )
    address = ConsulRegistry(client).lookup("risk")
    # An empty service address means the node's address (Consul's rule).
    assert address == ServiceAddress("risk", "10.0.0.9", 7002, 9103)
    assert last(http).qs == {"passing": ["true"]}
    assert last(http).headers["X-Consul-Token"] == TOKEN
    assert client.passing_instances("risk")[1].target == "10.0.0.3:7003"


def test_no_passing_instance_is_a_clear_error(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(f"{CONSUL}/v1/health/service/transfer-engine", json=[])
    with pytest.raises(RegistryError, match="no passing instance of transfer-engine"):
        ConsulRegistry(client).lookup("transfer-engine")


def test_service_names_are_path_quoted(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(rm.ANY, json=[])
    with pytest.raises(RegistryError):
        ConsulRegistry(client).lookup("../kv/x")
    assert last(http).path == "/v1/health/service/..%2fkv%2fx"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"status_code": 500, "text": "rpc error"}, "HTTP 500 to GET /v1/health/service/risk"),
        ({"status_code": 403, "text": "ACL not found"}, "refused the ACL token"),
        ({"exc": requests.ConnectionError("refused")}, "unreachable"),
        ({"json": [{"Service": {}}]}, "unexpected answer"),
        ({"text": "not json"}, "unexpected answer"),
    ],
)
def test_consul_failures_become_registry_errors(
    http: rm.Mocker, client: ConsulClient, answer: dict[str, Any], message: str
) -> None:
    http.get(f"{CONSUL}/v1/health/service/risk", **answer)
    with pytest.raises(RegistryError, match="cannot look up 'risk' in Consul") as caught:
        ConsulRegistry(client).lookup("risk")
    assert message in str(caught.value)


# -- KV --------------------------------------------------------------------------------------


def test_kv_value_is_base64_decoded(http: rm.Mocker, client: ConsulClient) -> None:
    text = policy_text(TE_ID)
    http.get(KV_URL, **kv_answer(text, 42))
    entry = client.kv_get(KEY)
    assert (entry.value, entry.index, entry.modify_index) == (text, 42, 42)
    assert last(http).qs == {}


def test_kv_absent_and_empty(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(KV_URL, status_code=404, headers={"X-Consul-Index": "5"})
    assert client.kv_get(KEY).value is None
    http.get(KV_URL, json=kv_body(None, 6), headers={"X-Consul-Index": "6"})
    assert client.kv_get(KEY).value == ""


def test_kv_blocking_query_parameters(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(KV_URL, **kv_answer("{}", 43))
    client.kv_get(KEY, index=42, wait=20)
    assert last(http).qs == {"index": ["42"], "wait": ["20000ms"]}
    assert last(http).timeout == pytest.approx(20 * 17 / 16 + 10)


@pytest.mark.parametrize(
    "answer",
    [
        {
            "json": [{"Key": KEY, "Value": "!!not base64", "ModifyIndex": 1}],
            "headers": {"X-Consul-Index": "1"},
        },
        {"json": kv_body("{}", 1)},  # no X-Consul-Index
        {"json": [], "headers": {"X-Consul-Index": "1"}},
    ],
)
def test_kv_malformed_answers(
    http: rm.Mocker, client: ConsulClient, answer: dict[str, Any]
) -> None:
    http.get(KV_URL, **answer)
    with pytest.raises(ConsulError, match="unexpected answer"):
        client.kv_get(KEY)


def test_kv_put(http: rm.Mocker, client: ConsulClient) -> None:
    http.put(KV_URL, text="true")
    client.kv_put(KEY, "{}")
    assert last(http).body == b"{}"
    http.put(KV_URL, text="false")
    with pytest.raises(ConsulError, match="did not store"):
        client.kv_put(KEY, "{}")


# -- the policy from Consul ------------------------------------------------------------------


def source(client: ConsulClient, clock: Clock, **kwargs: Any) -> ConsulPolicySource:
    return ConsulPolicySource(client, KEY, max_staleness=60, wait=20, clock=clock, **kwargs)


def test_policy_from_kv_decides_like_the_file(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(
        KV_URL,
        **kv_answer(
            policy_text(
                "spiffe://{trust_domain}/env/prod/zone/az1/team/payments/svc/transfer-engine"
            ),
            3,
        ),
    )
    consul = source(client, Clock())
    assert consul.poll(block=False)
    policy = Policy(consul, TD)
    assert allowed(policy)
    assert not allowed(policy, GW_ID)
    assert policy.decide("risk", "/grpc.health.v1.Health/Check", SpiffeId.parse(GW_ID)).allowed
    assert consul.describe() in f"Consul KV {KEY} at {CONSUL}"


def test_blocking_loop_applies_changes_keeps_the_last_policy_then_fails_closed(
    http: rm.Mocker, client: ConsulClient
) -> None:
    clock = Clock()
    consul = source(client, clock)
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 7))
    consul.poll(block=False)
    policy = Policy(consul, TD)
    assert allowed(policy)
    assert not allowed(policy, GW_ID)

    # The next query blocks on index 7; the key changes and the index advances.
    http.get(KV_URL, **kv_answer(policy_text(GW_ID), 9))
    clock.now += 15
    assert consul.poll()
    assert last(http).qs["index"] == ["7"]
    assert consul.index == 9
    assert allowed(policy, GW_ID)
    assert not allowed(policy)

    # Consul fails: the last good policy stays while it is fresh enough...
    http.get(KV_URL, status_code=500, text="No cluster leader")
    clock.now += 30
    assert not consul.poll()
    assert last(http).qs["index"] == ["9"]
    assert allowed(policy, GW_ID)
    clock.now += 29  # 59s since Consul last answered
    assert allowed(policy, GW_ID)

    # ...and past max staleness every request is denied, with the reason.
    clock.now += 2
    decision = policy.decide("risk", ASSESS, SpiffeId.parse(GW_ID))
    assert not decision.allowed
    assert decision.reason.startswith("policy unavailable: policy from Consul KV ztbank/policy")
    assert "stale: last confirmed 61s ago" in decision.reason
    assert "No cluster leader" in decision.reason

    # Consul is back (a timed-out blocking query, same index): the policy is usable again.
    http.get(KV_URL, **kv_answer(policy_text(GW_ID), 9))
    assert consul.poll()
    assert allowed(policy, GW_ID)


def test_a_quiet_watch_stays_fresh(http: rm.Mocker, client: ConsulClient) -> None:
    clock = Clock()
    consul = source(client, clock)
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 7))
    consul.poll(block=False)
    policy = Policy(consul, TD)
    for _ in range(10):  # every blocking query times out without a change
        clock.now += 21
        assert consul.poll()
        assert allowed(policy)


def test_deleted_key_denies_at_once(http: rm.Mocker, client: ConsulClient) -> None:
    consul = source(client, Clock())
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 7))
    consul.poll(block=False)
    policy = Policy(consul, TD)
    http.get(KV_URL, status_code=404, headers={"X-Consul-Index": "12"})
    assert consul.poll()
    decision = policy.decide("risk", ASSESS, SpiffeId.parse(TE_ID))
    assert not decision.allowed
    assert f"no policy at Consul KV {KEY}" in decision.reason


def test_invalid_document_in_kv_denies_everything(http: rm.Mocker, client: ConsulClient) -> None:
    consul = source(client, Clock())
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 7))
    consul.poll(block=False)
    policy = Policy(consul, TD)
    http.get(KV_URL, **kv_answer('{"rules": [', 8))
    consul.poll()
    decision = policy.decide("risk", ASSESS, SpiffeId.parse(TE_ID))
    assert not decision.allowed
    assert decision.reason.startswith("policy unavailable: invalid policy")


def test_index_going_backwards_resets_the_watch(http: rm.Mocker, client: ConsulClient) -> None:
    consul = source(client, Clock())
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 50))
    consul.poll(block=False)
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 3))  # e.g. a restored snapshot
    consul.poll()
    assert consul.index == 0
    consul.poll()
    assert "index" not in last(http).qs


def test_bad_token_at_start_keeps_the_service_down(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(KV_URL, status_code=403, text="ACL not found")
    consul = source(client, Clock())
    consul.poll(block=False)
    with pytest.raises(PolicyError, match=r"refused the ACL token in CONSUL_HTTP_TOKEN.*403"):
        Policy(consul, TD)


def test_the_watch_thread_applies_a_change(http: rm.Mocker, client: ConsulClient) -> None:
    http.get(
        KV_URL,
        [
            kv_answer(policy_text(TE_ID), 7),
            kv_answer(policy_text(TE_ID), 7),
            {"status_code": 500, "text": "leader lost"},
            kv_answer(policy_text(GW_ID), 8),
        ],
    )
    consul = ConsulPolicySource(
        client, KEY, max_staleness=60, wait=0.05, retry=0.01, min_interval=0.01
    ).start()
    try:
        policy = Policy(consul, TD)
        wait_until(
            lambda: allowed(policy, GW_ID), timeout=5, message="the watch never applied index 8"
        )
        assert not allowed(policy)
        queried = [r.qs.get("index") for r in http.request_history[:4]]
        assert queried == [None, ["7"], ["7"], ["7"]]
    finally:
        consul.close()


def test_file_source_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(policy_text(TE_ID))
    policy = Policy(path, TD)
    assert isinstance(policy.source, FilePolicySource)
    assert policy.source.describe() == str(path)


# -- create_runtime chooses the backend ------------------------------------------------------


class StubSource:
    def __init__(self, *_: Any, **__: Any) -> None:
        self.closed = False

    def current(self) -> Any:
        raise AssertionError("not used here")

    def close(self) -> None:
        self.closed = True


class StubRevocation:
    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def wait_ready(self, _timeout: float) -> None:
        pass

    def problem(self) -> str | None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def service_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings_environment: None
) -> ServiceSettings:
    monkeypatch.setattr(runtime_module, "SvidSource", StubSource)
    monkeypatch.setattr(runtime_module, "RevocationWatcher", StubRevocation)
    registry = tmp_path / "registry.json"
    write_registry(registry, [ServiceAddress("risk", "0.0.0.0", 50052)])
    policy = tmp_path / "policy.json"
    policy.write_text(policy_text(GW_ID))
    return ServiceSettings(
        home=tmp_path / "home",
        trust_domain=TD,
        registry=registry,
        policy=policy,
        audit_fsync=False,
    )


def test_runtime_uses_the_files_without_consul(service_settings: ServiceSettings) -> None:
    runtime = create_runtime("risk", service_settings)
    try:
        assert isinstance(runtime.registry, FileRegistry)
        assert isinstance(runtime.policy.source, FilePolicySource)
        assert runtime.consul_registration is None
        assert allowed(runtime.policy, GW_ID)
    finally:
        runtime.close()


def test_runtime_uses_consul_when_configured(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch, http: rm.Mocker
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "consul.test:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    monkeypatch.setenv("ZTBANK_CONSUL_ADVERTISE_HOST", "risk")
    http.get(KV_URL, **kv_answer(policy_text(TE_ID), 7))
    http.put(f"{CONSUL}/v1/agent/service/register")
    http.put(f"{CONSUL}/v1/agent/service/deregister/risk-risk-50052")
    http.get(f"{CONSUL}/v1/health/service/transfer-engine", json=[])
    runtime = create_runtime("risk", service_settings)
    try:
        assert runtime.address == ServiceAddress("risk", "0.0.0.0", 50052)
        assert isinstance(runtime.registry, ConsulRegistry)
        assert allowed(runtime.policy)  # from KV...
        assert not allowed(runtime.policy, GW_ID)  # ...not from the file
        registered = next(r for r in http.request_history if r.path.endswith("/register"))
        assert registered.json()["Check"]["TCP"] == "risk:50052"
        with pytest.raises(RegistryError, match="no passing instance of transfer-engine"):
            runtime.registry.lookup("transfer-engine")
    finally:
        runtime.close()
    paths = [r.path for r in http.request_history]
    assert "/v1/agent/service/deregister/risk-risk-50052" in paths


def test_runtime_does_not_start_without_a_policy_from_consul(
    service_settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch, http: rm.Mocker
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", CONSUL)
    http.get(KV_URL, status_code=404, headers={"X-Consul-Index": "1"})
    with pytest.raises(PolicyError, match="no policy at Consul KV ztbank/policy"):
        create_runtime("risk", service_settings)
    assert not any(r.path.endswith("/register") for r in http.request_history)
