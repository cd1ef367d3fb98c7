"""The stack the e2e suites run against, and the raw clients they use on it.

By default (``make test-e2e``) that is the whole native stack, started once per session by the
code behind ``make up``: ``services.stack.sandbox`` (as ``make bench`` uses it) has
``NativeStack.up()`` run the issuer, risk, transfer-engine and gateway as detached processes in a
short temp dir under /tmp (unix socket paths must fit in 108 bytes) with free ports of its own;
here with a 20 s SVID TTL and none of the developer's ``ZTBANK_*``, ``SPIFFE_*``, ``VAULT_*`` or
``OTEL_*`` variables.  The stack is always stopped and the dir removed, whatever happened.  With
``ZTBANK_E2E_STACK=existing`` the suites use a stack that is already up instead (the compose
stack, or one of ``make test-e2e-existing``): see ``tests/e2e/target.py``.

``E2EStack`` is what tests get: the settings and addresses plus raw clients that assert nothing
themselves — HTTPS to the gateway and gRPC channels to the other services with any credentials
(a workload's SVID, a minted one, one signed by a foreign CA, or none) — and readers of the audit
records and traces.  Waits poll with deadlines; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from services._proto import issuer_admin_pb2
from services.common.discovery.registry import FileRegistry, ServiceAddress
from services.common.errors import CommonError
from services.common.files import private_key_pem
from services.common.identity.pem import certificates_to_pem, serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.workloads import GATEWAY, OPS, RISK, SERVICES, TELLER, TRANSFER_ENGINE
from services.common.identity.x509svid import verify_der_chain
from services.common.settings import load_settings
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.admin_client import call_admin
from services.labs.teller import TellerClient
from services.stack.native import NativeStack, StackSettings, StackStatus, workload_svid
from services.stack.probe import ServiceProbe, metric_sample, probe
from services.stack.sandbox import sandbox_stack
from tests.e2e.target import E2ETargetSettings, jaeger_trace
from tests.support.helpers import scrub_environment, wait_until
from tests.support.pki import Issued

SVID_TTL = "20s"
WORKLOADS = {w.name: w for w in (*SERVICES, TELLER, OPS)}
GRPC_SERVICES = (TRANSFER_ENGINE.name, RISK.name)
HTTP_TIMEOUT = 10.0
RPC_TIMEOUT = 5.0
FILE_TIMEOUT = 10.0  # span exporters batch every 0.5 s; audit records are fsync'ed inline
OPS_REFRESH_SECONDS = 5.0

# -- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What a client presents (a chain and its key, or nothing) and the bundle it trusts."""

    bundle_pem: bytes
    chain_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def of(cls, material: SvidMaterial) -> Credentials:
        return cls(material.bundle_pem, material.chain_pem, material.key_pem)

    @classmethod
    def signed(
        cls, issued: Issued, bundle_pem: bytes, chain: Sequence[x509.Certificate] = ()
    ) -> Credentials:
        """A certificate made with tests.support.pki, presented with ``chain`` after it."""
        return cls(
            bundle_pem,
            certificates_to_pem([issued.certificate, *chain]),
            private_key_pem(issued.key),
        )

    @property
    def leaf(self) -> x509.Certificate:
        assert self.chain_pem is not None, "these credentials carry no certificate"
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    @property
    def serial(self) -> str:
        return serial_hex(self.leaf)

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def without_certificate(self) -> Credentials:
        return Credentials(self.bundle_pem)


AnyCredentials = Credentials | SvidMaterial


def as_credentials(credentials: AnyCredentials) -> Credentials:
    return credentials if isinstance(credentials, Credentials) else Credentials.of(credentials)


def tls_client_context(credentials: AnyCredentials, alpn: Sequence[str]) -> ssl.SSLContext:
    """A client context that trusts the credentials' bundle and presents their chain, if any.

    Host names are not checked: the server is identified by its SPIFFE ID afterwards.
    """
    creds = as_credentials(credentials)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.load_verify_locations(cadata=creds.bundle_pem.decode())
    context.set_alpn_protocols(list(alpn))
    # A test client may hold keys the server must refuse (RSA 1024): the servers, not this
    # client, enforce the policy under test.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if creds.chain_pem is not None and creds.key_pem is not None:
        with tempfile.TemporaryDirectory(prefix="zte-cred-") as directory:
            chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
            chain.write_bytes(creds.chain_pem)
            key.touch(mode=0o600)
            key.write_bytes(creds.key_pem)
            context.load_cert_chain(chain, key)
    return context


# -- raw clients -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpsReply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: Any  # parsed JSON, else text
    server_certificate: x509.Certificate  # what the gateway served on this connection
    # Both ends of the connection as we saw them, as the gateway's audit records them (loopback
    # natively, the containers' addresses on the compose network).
    local_addr: str
    local_port: int
    peer_addr: str
    tls_version: str | None
    cipher: str | None

    @property
    def server_serial(self) -> str:
        return serial_hex(self.server_certificate)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    @property
    def is_problem(self) -> bool:
        return self.content_type.startswith("application/problem+json") and (
            isinstance(self.body, dict) and self.body.get("status") == self.status
        )


class GatewayRefusedError(Exception):
    """The gateway gave no HTTP answer: the handshake failed or the connection was closed."""

    def __init__(self, stage: str, error: BaseException, local_port: int | None) -> None:
        super().__init__(f"refused at {stage}: {type(error).__name__}: {error}")
        self.stage = stage  # "handshake" or "request"
        self.error = error
        self.local_port = local_port


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: a writer may be in the middle of the last one."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


@dataclass
class E2EStack:
    settings: StackSettings
    addresses: dict[str, ServiceAddress]
    target: E2ETargetSettings
    identity: Callable[[str], SvidMaterial]  # a workload's SVID, by its name
    native: NativeStack | None  # None: a stack this session did not start and may not stop
    _ops: SvidMaterial | None = None

    @property
    def trust_domain(self) -> str:
        return self.settings.trust_domain

    @property
    def home(self) -> Path:
        return self.settings.home

    def spiffe_id(self, workload: str) -> str:
        return str(WORKLOADS[workload].spiffe_id(self.trust_domain))

    # -- identities ----------------------------------------------------------------------------

    def teller(self) -> TellerClient:
        """A new teller CLI client, holding a freshly fetched teller SVID."""
        return TellerClient(self.settings, self.svid(TELLER.name))

    def svid(self, workload: str) -> SvidMaterial:
        """The current SVID the issuer gives ``workload`` (its own socket, or its uid)."""
        return self.identity(workload)

    def bundle_pem(self) -> bytes:
        """The trust domain's current bundle, as every workload receives it."""
        return self.svid(OPS.name).bundle_pem

    def mint(self, spiffe_id: str, *, ttl_seconds: int = 0) -> Credentials:
        """An SVID for any ID of the trust domain from the issuer's admin API (0: default TTL)."""
        request = issuer_admin_pb2.MintX509SVIDRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
        response = call_admin(self.settings.admin_socket, lambda stub: stub.MintX509SVID(request))
        return Credentials(response.bundle_pem, response.chain_pem, response.key_pem)

    def signing_ca(self) -> Issued:
        """The issuer's active signing CA, read from its 0600 state file (the tests run as its
        user, or as root): a trust anchor of every bundle, chained to the upstream's root (on
        disk or in Vault), so what it signs chains to the real trust domain."""
        state = self.settings.home_of("issuer") / "issuer" / "authority.json"
        active = AuthorityFile(state).load().active
        assert active is not None, "the issuer has no active signing CA"
        return Issued(active.ca_cert, active.ca_key)

    # -- clients -------------------------------------------------------------------------------

    def https(
        self,
        credentials: AnyCredentials,
        method: str,
        path: str,
        *,
        body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpsReply:
        """One request on a new TLS connection to the gateway.

        ``body`` is sent as JSON, ``data`` as is.  Raises ``GatewayRefusedError`` if no HTTP
        answer comes back; fails the test if the server is not the gateway.
        """
        creds = as_credentials(credentials)
        address = self.addresses[GATEWAY.name]
        context = tls_client_context(creds, ["http/1.1"])
        connection = http.client.HTTPSConnection(
            address.host, address.port, context=context, timeout=HTTP_TIMEOUT
        )
        try:
            try:
                connection.connect()
            except OSError as error:  # ssl.SSLError is one
                raise GatewayRefusedError("handshake", error, None) from error
            tls = connection.sock
            assert isinstance(tls, ssl.SSLSocket)
            local_addr, local_port = tls.getsockname()[:2]
            peer_addr = tls.getpeername()[0]
            der = tls.getpeercert(binary_form=True)
            assert der is not None, "the gateway sent no certificate"
            bundle = x509.load_pem_x509_certificates(creds.bundle_pem)
            served = verify_der_chain([der], bundle, trust_domain=self.trust_domain)
            assert str(served) == self.spiffe_id(GATEWAY.name), f"the server is {served}"
            cipher = tls.cipher()
            version = tls.version()
            payload = json.dumps(body).encode() if body is not None else data
            all_headers = {"Accept": "application/json"}
            if payload is not None:
                all_headers["Content-Type"] = "application/json"
            all_headers.update(headers or {})
            try:
                connection.request(method, path, body=payload, headers=all_headers)
                response = connection.getresponse()
                raw = response.read()
            except (OSError, http.client.HTTPException) as error:
                raise GatewayRefusedError("request", error, local_port) from error
        finally:
            connection.close()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return HttpsReply(
            status=response.status,
            headers={k.lower(): v for k, v in response.getheaders()},
            body=parsed,
            server_certificate=x509.load_der_x509_certificate(der),
            local_addr=str(local_addr),
            local_port=int(local_port),
            peer_addr=str(peer_addr),
            tls_version=version,
            cipher=cipher[0] if cipher else None,
        )

    def grpc_channel(self, service: str, credentials: AnyCredentials) -> grpc.Channel:
        """A new secure channel to ``service`` (use it with ``with``; never reuse it closed).

        The server's certificate must carry the DNS SAN ``service``, as the services require.
        A local subchannel pool keeps other channels' connections (and credentials) out of it.
        """
        creds = as_credentials(credentials)
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=creds.bundle_pem,
            private_key=creds.key_pem,
            certificate_chain=creds.chain_pem,
        )
        return grpc.secure_channel(
            self.addresses[service].target,
            channel_credentials,
            options=[
                ("grpc.ssl_target_name_override", service),
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )

    # -- records -------------------------------------------------------------------------------

    def audit(self, service: str) -> list[dict[str, Any]]:
        home = self.settings.home_of(service)
        return read_jsonl(home / "audit" / f"{service}.jsonl")

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        """Every span of one trace so far, from every service (span-sink records)."""
        if self.target.traces == "jaeger":
            return jaeger_trace(self.target.jaeger_url, trace_id)
        return [
            span
            for workload in SERVICES
            for span in read_jsonl(
                self.settings.home_of(workload.name) / "telemetry" / f"{workload.name}-spans.jsonl"
            )
            if span["trace_id"] == trace_id
        ]

    def wait_for_audit(
        self, service: str, match: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in reversed(self.audit(service)) if match(r)), None)

        return wait_until(
            found,
            timeout=FILE_TIMEOUT,
            message=lambda: (
                f"no audit record at {service} for {what}; last records:\n"
                + "\n".join(json.dumps(r) for r in self.audit(service)[-5:])
            ),
        )

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def controlled(self) -> NativeStack:
        """The stack's processes, to stop and start; skips the test on a stack not ours."""
        if self.native is None:
            pytest.skip("stops and starts the stack's processes: sandbox stack only (test-e2e)")
        return self.native

    def probes(self) -> dict[str, ServiceProbe]:
        """Each service's health and served SVID, probed over mTLS as ``ztbank status`` does."""
        if self._ops is None or self._ops.seconds_left() < OPS_REFRESH_SECONDS:
            self._ops = self.svid(OPS.name)
        ops, domain = self._ops, self.trust_domain
        return {
            w.name: probe(self.addresses[w.name], w.spiffe_id(domain), ops, https=w == GATEWAY)
            for w in SERVICES
        }

    def wait_until_healthy(self, timeout: float) -> None:
        def unhealthy() -> dict[str, str | None]:
            try:
                return {n: p.error for n, p in self.probes().items() if not p.healthy}
            except CommonError as error:  # no ops SVID yet
                return {"ops": str(error)}

        wait_until(
            lambda: not unhealthy(),
            timeout=timeout,
            message=lambda: f"the stack is not healthy: {unhealthy()}",
            interval=1.0,
        )

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``ztbank ARGS`` as an operator of this stack would run it."""
        env = {
            **os.environ,
            "ZTBANK_HOME": str(self.settings.home),
            "ZTBANK_CERTS_DIR": str(self.settings.certs_dir),
            "ZTBANK_TRUST_DOMAIN": self.trust_domain,
            "ZTBANK_ISSUER_HTTP": self.settings.issuer_http,
            "ZTBANK_REGISTRY": str(self.settings.registry),
        }
        executable = Path(sys.executable).with_name("ztbank")
        return subprocess.run(
            [str(executable), *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def metric(self, service: str, name: str) -> float | None:
        """One sample of a Prometheus metric from the service's metrics port."""
        self.controlled  # noqa: B018 - only the sandbox serves metrics on 127.0.0.1
        return metric_sample(self.addresses[service], name)

    def restart(self) -> StackStatus:
        """``down()`` then ``up()`` of the same stack: same home, certs and ports."""
        self.controlled.down()
        return self.controlled.up()

    def log_tails(self) -> str:
        native = self.controlled
        return "\n".join(
            f"--- {p.name} ---\n{p.log_tail()}" for p in (native.issuer, *native.services.values())
        )


def balances(teller: TellerClient, customer: str) -> dict[str, Decimal]:
    """The customer's accounts and balances as GET /v1/accounts shows them."""
    reply = teller.as_customer(customer, "GET", "/v1/accounts")
    assert reply.status == 200, reply
    return {a["id"]: Decimal(a["balance"]) for a in reply.body["accounts"]}


def _e2e_stack(
    target: E2ETargetSettings, settings: StackSettings, native: NativeStack | None
) -> E2EStack:
    return E2EStack(
        settings=settings,
        addresses=FileRegistry(settings.registry).services(),
        target=target,
        identity=partial(workload_svid, settings),
        native=native,
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[E2EStack]:
    """The sandbox stack of ``make bench`` (services.stack.sandbox), in a clean environment;
    with ZTBANK_E2E_STACK=existing, the stack the ZTBANK_* settings point at, once healthy."""
    target = load_settings(E2ETargetSettings)
    if target.stack == "existing":
        existing = _e2e_stack(target, load_settings(StackSettings), None)
        existing.wait_until_healthy(target.ready_timeout)
        yield existing
        return
    env = pytest.MonkeyPatch()
    try:
        scrub_environment(env)  # the stack's processes inherit this process's environment
        with sandbox_stack(svid_ttl=SVID_TTL) as native:
            yield _e2e_stack(target, native.settings, native)
    finally:
        env.undo()
