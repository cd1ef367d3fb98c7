"""Revocation bites (issue 4): measured from the moment `ztbank revoke` returns.

At the gateway and at a gRPC service, a victim SVID (minted for the service's legitimate
caller) is used on an open connection and for new connections while a bystander keeps working.
After ``ztbank revoke --serial``: new handshakes are refused and the open connection is cut (or
every call on it refused) within 2 s; the bystander sees no failure; the CRL lists the serial;
OCSP says revoked.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from services._proto import ledger_pb2
from services.common.identity.workloads import GATEWAY, TELLER, TRANSFER_ENGINE
from services.issuer.domain.revocation import ocsp_url
from services.labs.revocation import ocsp_status
from tests.e2e.conftest import Credentials, E2EStack, GatewayRefusedError, tls_client_context
from tests.support.helpers import one_line

pytestmark = pytest.mark.e2e

BUDGET_SECONDS = 2.0
POLL_SECONDS = 0.05
LIST_ACCOUNTS = "/ztbank.ledger.v1.TransferEngine/ListAccounts"


class Bystander:
    """A legitimate teller sending on new connections the whole time; it must never fail."""

    def __init__(self, stack: E2EStack, token: str) -> None:
        self._stack = stack
        self._token = token
        self._stop = threading.Event()
        self.sent = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        svid = self._stack.svid(TELLER.name)
        while not self._stop.is_set():
            if svid.seconds_left() < 5:
                svid = self._stack.svid(TELLER.name)
            try:
                reply = self._stack.https(
                    svid, "GET", "/v1/accounts", headers={"Authorization": f"Bearer {self._token}"}
                )
                if reply.status != 200:
                    self.failures.append(f"HTTP {reply.status}: {reply.body}")
            except GatewayRefusedError as error:
                self.failures.append(str(error))
            self.sent += 1
            time.sleep(POLL_SECONDS)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def _revoke(stack: E2EStack, serial: str) -> float:
    result = stack.cli("revoke", "--serial", serial, "--reason", "keyCompromise")
    returned = time.monotonic()
    assert result.returncode == 0, result.stderr
    return returned


def _first_failure(
    checks: dict[str, Callable[[], bool]], since: float, budget: float = BUDGET_SECONDS + 3
) -> dict[str, float]:
    """Seconds after ``since`` at which each check first reported a refusal."""
    found: dict[str, float] = {}
    while len(found) < len(checks) and time.monotonic() < since + budget:
        for name, refused in checks.items():
            if name not in found and refused():
                found[name] = time.monotonic() - since
        time.sleep(POLL_SECONDS)
    return found


def _keep_alive(stack: E2EStack, victim: Credentials) -> http.client.HTTPSConnection:
    address = stack.addresses[GATEWAY.name]
    connection = http.client.HTTPSConnection(
        address.host, address.port, context=tls_client_context(victim, ["http/1.1"]), timeout=5
    )
    connection.connect()
    return connection


def _get(connection: http.client.HTTPSConnection, token: str) -> int:
    connection.request("GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    response.read()
    return response.status


def _crl_serials(stack: E2EStack) -> set[str]:
    with urllib.request.urlopen(f"http://{stack.settings.issuer_http}/crls", timeout=5) as reply:
        text = reply.read().decode()
    end = "-----END X509 CRL-----"
    crls = [
        x509.load_pem_x509_crl((block + end).encode()) for block in text.split(end) if block.strip()
    ]
    return {format(entry.serial_number, "x") for crl in crls for entry in crl}


def _ocsp_status(stack: E2EStack, credentials: Credentials) -> ocsp.OCSPCertStatus:
    """The issuer's answer, its signature verified against the issuing CA (as the lab does)."""
    assert credentials.chain_pem is not None
    leaf, issuer = x509.load_pem_x509_certificates(credentials.chain_pem)[:2]
    return ocsp.OCSPCertStatus[ocsp_status(ocsp_url(stack.settings.issuer_url), leaf, issuer)]


def test_revoked_teller_is_cut_off_at_the_gateway(stack: E2EStack) -> None:
    token = stack.teller().token("alice")
    victim = stack.mint(stack.spiffe_id(TELLER.name), ttl_seconds=120)
    open_connection = _keep_alive(stack, victim)
    assert _get(open_connection, token) == 200
    assert (
        stack.https(
            victim, "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"}
        ).status
        == 200
    )
    assert _ocsp_status(stack, victim) == ocsp.OCSPCertStatus.GOOD

    cut: list[bool] = [False]

    def open_refused() -> bool:
        if not cut[0]:
            try:
                cut[0] = _get(open_connection, token) != 200
            except (OSError, http.client.HTTPException):
                cut[0] = True
        return cut[0]

    def new_refused() -> bool:
        try:
            reply = stack.https(
                victim, "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"}
            )
        except GatewayRefusedError:
            return True
        return reply.status != 200

    with Bystander(stack, token) as bystander:
        revoked_at = _revoke(stack, victim.serial)
        timings = _first_failure({"open": open_refused, "new": new_refused}, revoked_at)
        time.sleep(1.0)  # keep the bystander going past the revocation
    open_connection.close()

    assert timings.get("new", 99) <= BUDGET_SECONDS, timings
    assert timings.get("open", 99) <= BUDGET_SECONDS, timings
    assert bystander.sent > 10
    assert not bystander.failures, bystander.failures[:3]
    assert victim.serial in _crl_serials(stack)
    assert _ocsp_status(stack, victim) == ocsp.OCSPCertStatus.REVOKED
    denials = [
        r
        for r in stack.audit(GATEWAY.name)
        if r["cert_serial"] == victim.serial and r["decision"] == "deny"
    ]
    assert any("revoked" in r["reason"] for r in denials), denials[-3:]


def _list_accounts(channel: grpc.Channel) -> grpc.StatusCode:
    call = channel.unary_unary(
        LIST_ACCOUNTS,
        request_serializer=ledger_pb2.ListAccountsRequest.SerializeToString,
        response_deserializer=ledger_pb2.ListAccountsResponse.FromString,
    )
    try:
        call(ledger_pb2.ListAccountsRequest(customer="alice"), timeout=5)
    except grpc.RpcError as error:
        if not isinstance(error, grpc.Call):
            raise
        return error.code()
    return grpc.StatusCode.OK


def test_revoked_gateway_identity_is_cut_off_at_the_transfer_engine(stack: E2EStack) -> None:
    token = stack.teller().token("alice")
    victim = stack.mint(stack.spiffe_id(GATEWAY.name), ttl_seconds=120)
    with stack.grpc_channel(TRANSFER_ENGINE.name, victim) as open_channel:
        assert _list_accounts(open_channel) == grpc.StatusCode.OK

        def open_refused() -> bool:
            return _list_accounts(open_channel) != grpc.StatusCode.OK

        def new_refused() -> bool:
            with stack.grpc_channel(TRANSFER_ENGINE.name, victim) as fresh:
                return _list_accounts(fresh) != grpc.StatusCode.OK

        with Bystander(stack, token) as bystander:  # teller -> gateway -> transfer-engine
            revoked_at = _revoke(stack, victim.serial)
            timings = _first_failure({"open": open_refused, "new": new_refused}, revoked_at)
            time.sleep(1.0)
        assert _list_accounts(open_channel) == grpc.StatusCode.UNAUTHENTICATED

    assert timings.get("new", 99) <= BUDGET_SECONDS, timings
    assert timings.get("open", 99) <= BUDGET_SECONDS, timings
    assert bystander.sent > 10
    assert not bystander.failures, bystander.failures[:3]
    assert victim.serial in _crl_serials(stack)
    assert _ocsp_status(stack, victim) == ocsp.OCSPCertStatus.REVOKED


def test_status_shows_the_signing_ca_and_each_revocation(stack: E2EStack) -> None:
    """`ztbank status --json` asks the issuer's admin API: a trainer sees the revocation land."""

    def authority() -> dict[str, Any]:
        result = stack.cli("status", "--json")
        document = json.loads(result.stdout)
        assert document["issuer"]["authority"] is not None, result.stdout
        return dict(document["issuer"]["authority"])

    before = authority()
    victim = stack.mint(stack.spiffe_id(TELLER.name), ttl_seconds=60)
    _revoke(stack, victim.serial)
    after = authority()

    assert after["revoked_certificates"] == before["revoked_certificates"] + 1
    assert after["crl_number"] > before["crl_number"]
    signing_ca = x509.load_pem_x509_certificates(victim.chain_pem or b"")[1]
    assert after["active_ca_serial"] == format(signing_ca.serial_number, "x")
    not_after = datetime.fromisoformat(after["active_ca_not_after"])
    assert not_after == signing_ca.not_valid_after_utc
    assert after["upstream"] in {"disk", "vault"}
    assert after["entries"] >= 5  # the three services, the teller and ops


def test_the_revocation_lab_shows_a_connected_client_cut_off(stack: E2EStack) -> None:
    """`ztbank lab revocation` (`make lab-revocation`): what a trainer runs in class."""
    result = stack.cli("lab", "revocation")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "lab revocation: a connected teller client is revoked"
    assert lines[-1].startswith("lab passed: the revoked client was cut off within")
    serial = re.search(r"serial ([0-9a-f]{12})…", lines[1])
    assert serial, lines[1]
    assert any(line.startswith("  5 ") and "OCSP answers REVOKED" in line for line in lines)
    denials = [
        r
        for r in stack.audit(GATEWAY.name)
        if (r["cert_serial"] or "").startswith(serial.group(1)) and r["decision"] == "deny"
    ]
    assert denials, "the lab's victim was never refused at the gateway"
    assert result.stderr == ""


def test_revoking_an_unknown_serial_is_a_clear_error(stack: E2EStack) -> None:
    result = stack.cli("revoke", "--serial", "abcdef0123456789")
    assert result.returncode == 2
    assert "unknown serial" in one_line(result.stderr)


def test_tls_session_resumption_does_not_let_a_revoked_client_back_in(stack: E2EStack) -> None:
    token = stack.teller().token("alice")
    victim = stack.mint(stack.spiffe_id(TELLER.name), ttl_seconds=120)
    context = tls_client_context(victim, ["http/1.1"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.3 gets no tickets at all
    address = stack.addresses[GATEWAY.name]
    first = http.client.HTTPSConnection(address.host, address.port, context=context, timeout=5)
    first.connect()
    assert _get(first, token) == 200
    assert isinstance(first.sock, ssl.SSLSocket)
    session = first.sock.session
    first.close()
    _revoke(stack, victim.serial)
    time.sleep(BUDGET_SECONDS)

    second = http.client.HTTPSConnection(address.host, address.port, context=context, timeout=5)
    try:
        raw = second._create_connection((address.host, address.port), 5)  # type: ignore[attr-defined]
        tls = context.wrap_socket(raw, session=session)
        second.sock = tls
        with pytest.raises((OSError, http.client.HTTPException)):
            _get(second, token)
    finally:
        second.close()
