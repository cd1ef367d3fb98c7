"""The Consul client against a real Consul agent: register, look up, put a policy, watch it change.

Runs only with CONSUL_HTTP_ADDR set (plus CONSUL_HTTP_TOKEN with ACLs, CONSUL_CACERT for https),
e.g. against ``consul agent -dev``.  The token needs service:write on ``ztbank-live-*``,
node/service read, and key:write on ``ztbank/test/``.  The TCP check targets a listener this test
opens on ZTBANK_TEST_CHECK_HOST (default 127.0.0.1): set it to an address the agent can reach
when Consul runs elsewhere (e.g. in a container).  Every name and key is unique per run and
removed at the end.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from services.common.authz.policy import Policy
from services.common.discovery.consul.client import ConsulCheck, ConsulClient
from services.common.discovery.consul.policy_source import ConsulPolicySource
from services.common.discovery.consul.registry import ConsulRegistry
from services.common.discovery.consul.settings import ConsulSettings
from services.common.discovery.registry import RegistryError
from services.common.identity.spiffe_id import SpiffeId
from services.common.settings import load_settings
from tests.support.helpers import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.environ.get("CONSUL_HTTP_ADDR"),
        reason="needs a real Consul: set CONSUL_HTTP_ADDR (and CONSUL_HTTP_TOKEN with ACLs)",
    ),
]

TD = "ztbank.example"
TE_ID = f"spiffe://{TD}/env/prod/zone/az1/team/payments/svc/transfer-engine"
GW_ID = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/gateway"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
CHECK_HOST = os.environ.get("ZTBANK_TEST_CHECK_HOST", "127.0.0.1")
TIMEOUT = 30.0


def policy_text(caller: str) -> str:
    return json.dumps({"rules": [{"service": "risk", "methods": [ASSESS], "callers": [caller]}]})


@pytest.fixture
def client() -> Iterator[ConsulClient]:
    client = load_settings(ConsulSettings).client()
    yield client
    client.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """What the TCP check connects to."""
    with socket.create_server((CHECK_HOST, 0)) as server:
        yield server


def test_register_lookup_deregister(client: ConsulClient, listener: socket.socket) -> None:
    name = f"ztbank-live-{uuid.uuid4().hex[:8]}"
    port = listener.getsockname()[1]
    registry = ConsulRegistry(client)
    service_id = client.register_service(
        name,
        CHECK_HOST,
        port,
        ConsulCheck(tcp=f"{CHECK_HOST}:{port}", interval="1s", timeout="1s"),
        meta={"metrics_port": "9999"},
    )
    try:

        def found() -> bool:
            try:
                return registry.lookup(name).target == f"{CHECK_HOST}:{port}"
            except RegistryError:
                return False

        wait_until(found, timeout=TIMEOUT, message=f"{name} never became passing in Consul")
        assert registry.lookup(name).metrics_port == 9999
    finally:
        client.deregister_service(service_id)
    wait_until(
        lambda: not client.passing_instances(name),
        timeout=TIMEOUT,
        message=f"{name} still listed after deregistration",
    )
    with pytest.raises(RegistryError, match=f"no passing instance of {name}"):
        registry.lookup(name)


def test_unhealthy_instance_is_not_returned(client: ConsulClient) -> None:
    name = f"ztbank-live-{uuid.uuid4().hex[:8]}"
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]  # closed again: nothing listens there
    service_id = client.register_service(
        name, "127.0.0.1", port, ConsulCheck(tcp=f"127.0.0.1:{port}", interval="1s")
    )
    try:
        with pytest.raises(RegistryError, match=f"no passing instance of {name}"):
            ConsulRegistry(client).lookup(name)
    finally:
        client.deregister_service(service_id)


def test_policy_put_and_watched(client: ConsulClient) -> None:
    key = f"ztbank/test/{uuid.uuid4().hex[:8]}/policy"
    client.kv_put(key, policy_text(TE_ID))
    source = ConsulPolicySource(
        load_settings(ConsulSettings).client(), key, max_staleness=10, wait=2
    ).start()
    try:
        policy = Policy(source, TD)
        start_index = source.index
        assert policy.decide("risk", ASSESS, SpiffeId.parse(TE_ID)).allowed
        assert not policy.decide("risk", ASSESS, SpiffeId.parse(GW_ID)).allowed

        client.kv_put(key, policy_text(GW_ID))
        wait_until(
            lambda: policy.decide("risk", ASSESS, SpiffeId.parse(GW_ID)).allowed,
            timeout=TIMEOUT,
            message="the watched policy never changed",
        )
        assert source.index > start_index
        assert not policy.decide("risk", ASSESS, SpiffeId.parse(TE_ID)).allowed

        client.kv_delete(key)
        wait_until(
            lambda: not policy.decide("risk", ASSESS, SpiffeId.parse(GW_ID)).allowed,
            timeout=TIMEOUT,
            message="a deleted policy key still allowed calls",
        )
    finally:
        source.close()
        client.kv_delete(key)
