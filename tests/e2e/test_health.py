"""Health that tells the truth, on the running stack: a service that would refuse work says it
is not ready, with its own reason, wherever it is asked (its local health socket through
``ztbank health`` and ``ztbank status``, the gateway's /readyz and the gRPC services' health
over mTLS), stays live, and is ready again by itself once the cause is gone."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.files import write_atomic
from services.common.identity.workloads import GATEWAY, OPS, RISK, TRANSFER_ENGINE
from services.labs.support import policy_lock
from services.stack.native import StackSettings
from tests.e2e.conftest import E2EStack
from tests.support.helpers import wait_until

pytestmark = pytest.mark.e2e

SERVICES = (GATEWAY.name, TRANSFER_ENGINE.name, RISK.name)
BROKEN = "policy unavailable: invalid policy"
# The policy is re-read within 0.5 s and readiness beats every 0.5 s; a busy runner is slower.
# SVIDs live 20 s here: each request over mTLS fetches the ops SVID anew.
TURN_TIMEOUT = 20


@contextmanager
def broken_policy(settings: StackSettings) -> Iterator[None]:
    """The policy file every service watches, truncated mid-JSON, then put back as it was."""
    path = settings.policy
    with policy_lock(settings):
        original = path.read_bytes()
        status = os.stat(path)
        mode, owner = stat.S_IMODE(status.st_mode), (status.st_uid, status.st_gid)
        write_atomic(path, original[: len(original) // 2], mode, owner=owner)
        try:
            yield
        finally:
            write_atomic(path, original, mode, owner=owner)


def own_word(stack: E2EStack, service: str) -> tuple[int, str]:
    done = stack.cli("health", service)
    assert not done.stderr, done.stderr
    return done.returncode, done.stdout


def grpc_status(stack: E2EStack, service: str) -> Any:
    with stack.grpc_channel(service, stack.svid(OPS.name)) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return reply.status


def every_service(stack: E2EStack, code: int) -> bool:
    return all(own_word(stack, service)[0] == code for service in SERVICES)


def test_a_broken_policy_is_told_as_each_services_own_reason(stack: E2EStack) -> None:
    for service in SERVICES:
        assert own_word(stack, service) == (0, f"{service}: ready\n")

    with broken_policy(stack.settings):
        wait_until(
            lambda: every_service(stack, 1),
            timeout=TURN_TIMEOUT,
            message=lambda: (
                "not every service turned not ready: "
                + json.dumps({s: own_word(stack, s) for s in SERVICES})
            ),
        )
        for service in SERVICES:
            assert own_word(stack, service)[0] == 1
            said = own_word(stack, service)[1]
            assert said.startswith(f"{service}: not ready\n  {BROKEN}"), said
        # Over mTLS too: the gateway answers /readyz with its reasons, the gRPC services
        # NOT_SERVING; liveness is untouched (a restart would not help).
        ready = stack.https(stack.svid(OPS.name), "GET", "/readyz")
        assert ready.status == 503
        assert ready.is_problem
        assert ready.body["title"] == "Not ready"
        assert ready.body["reasons"][0].startswith(BROKEN)
        assert stack.https(stack.svid(OPS.name), "GET", "/livez").body == {"status": "live"}
        for service in (TRANSFER_ENGINE.name, RISK.name):
            assert grpc_status(stack, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        status = stack.cli("status")
        assert status.returncode == 1
        for service in SERVICES:
            line = next(line for line in status.stdout.splitlines() if line.startswith(service))
            assert f"NOT READY (not ready: {BROKEN}" in line, status.stdout

    wait_until(
        lambda: every_service(stack, 0),
        timeout=TURN_TIMEOUT,
        message="the services did not say ready again once the policy was back",
    )
    assert stack.https(stack.svid(OPS.name), "GET", "/readyz").body == {"status": "ready"}
    for service in (TRANSFER_ENGINE.name, RISK.name):
        assert grpc_status(stack, service) == health_pb2.HealthCheckResponse.SERVING
