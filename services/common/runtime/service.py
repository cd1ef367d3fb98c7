"""What every bank service needs at run time, built once by its factory: identity from the
Workload API, revocation from the issuer's CRLs, peer verification, policy, audit, telemetry and
discovery."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import AliasChoices, Field, model_validator

from services.common.authz.audit import AuditLog
from services.common.authz.policy import Policy, PolicySource
from services.common.discovery.consul.policy_source import ConsulPolicySource
from services.common.discovery.consul.registration import ConsulRegistration
from services.common.discovery.consul.registry import ConsulRegistry
from services.common.discovery.consul.settings import ConsulSettings
from services.common.discovery.registry import FileRegistry, ServiceAddress, ServiceRegistry
from services.common.errors import CommonError
from services.common.identity.source import SvidSource
from services.common.identity.workloads import Workload
from services.common.mtls.contexts import PeerVerifier
from services.common.mtls.grpc import (
    AuthorizationInterceptor,
    MtlsChannel,
    server_credentials,
)
from services.common.observability.telemetry import Telemetry, record_handshake, setup_telemetry
from services.common.resilience.circuit import CircuitBreaker
from services.common.resilience.settings import BreakerConfig
from services.common.resilience.trust_table import TrustTable
from services.common.resilience.watched import watched_breaker
from services.common.revocation import DEFAULT_INTERVAL, RevocationWatcher
from services.common.runtime.health import (
    HealthSocket,
    ServiceHealth,
    health_socket,
    keep_watch,
    svid_problem,
)
from services.common.settings import ZtbankSettings, load_settings, socket_path_from_endpoint

logger = logging.getLogger(__name__)


class ListenError(CommonError):
    """The service cannot listen where the registry says it does."""


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceSettings(ZtbankSettings):
    """Settings shared by gateway, transfer-engine and risk."""

    endpoint_socket: str = Field(
        default="",
        validation_alias=AliasChoices("SPIFFE_ENDPOINT_SOCKET", "ZTBANK_ENDPOINT_SOCKET"),
    )
    registry: Path = Path("infra/registry.json")
    policy: Path = Path("infra/policy.json")
    audit_fsync: bool = True
    svid_timeout_seconds: float = 30.0
    # CRL polling of <issuer_url>/crls, and how long startup waits for the first fresh CRL.
    revocation_interval_seconds: float = Field(default=DEFAULT_INTERVAL, gt=0)
    revocation_timeout_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _paths(self) -> ServiceSettings:
        self.registry = self.registry.absolute()
        self.policy = self.policy.absolute()
        if self.endpoint_socket:
            try:
                socket_path_from_endpoint(self.endpoint_socket)
            except ValueError as error:
                raise ValueError(f"SPIFFE_ENDPOINT_SOCKET: {error}") from None
        return self

    def workload_endpoint(self, service: str) -> str:
        """The service's own Workload API socket unless SPIFFE_ENDPOINT_SOCKET says otherwise."""
        return self.endpoint_socket or f"unix://{self.workload_socket_for(service)}"


@dataclass
class ServiceRuntime:
    """What ``create_runtime`` made; ``close()`` undoes it."""

    name: str
    settings: ServiceSettings
    address: ServiceAddress
    source: SvidSource
    revocation: RevocationWatcher
    verifier: PeerVerifier
    policy: Policy
    audit: AuditLog
    telemetry: Telemetry
    registry: ServiceRegistry
    health: ServiceHealth
    # The compose stack's Consul pieces; None on the native stack (files).
    consul_registration: ConsulRegistration | None = None
    consul_policy: ConsulPolicySource | None = None
    # The closing of every resource above, pushed as it was made: undone newest first, so
    # nothing is closed before what was built on it.
    resources: ExitStack = field(default_factory=ExitStack, repr=False)

    def channel_to(self, service: str) -> MtlsChannel:
        """An mTLS grpc.aio channel to a gRPC service, checked against its DNS SAN (its service
        name), that follows the service when the registry moves it."""
        return MtlsChannel(
            self.source,
            lambda: self.registry.lookup(service).target,
            service,
            on_connect=lambda started, ok: record_handshake(
                self.telemetry, self.name, "client", started, ok=ok
            ),
        )

    def breaker_to(
        self, callee: Workload, channel: MtlsChannel, table: TrustTable, config: BreakerConfig
    ) -> CircuitBreaker:
        """The circuit breaker of this service's calls to ``callee`` over ``channel``; its peer
        watch stops when the runtime closes, first: it looks with the runtime's source and
        verifier."""
        breaker = watched_breaker(
            callee.name,
            callee.spiffe_id(self.settings.trust_domain),
            address=lambda: channel.target,
            material=self.source.current,
            verifier=self.verifier,
            table=table,
            config=config,
            meter=self.telemetry.meter,
        )
        self.resources.callback(breaker.close)
        self.health.require(f"breaker to {callee.name}", breaker.problem)
        return breaker

    def close(self) -> None:
        """Close every resource, newest first, even if one fails (its error is raised at the
        end); the stack empties as it goes, so a second call does nothing."""
        self.resources.close()


def create_runtime(name: str, settings: ServiceSettings) -> ServiceRuntime:
    """Everything ``name`` needs, once its SVID is fetched and its CRLs are fresh: a service
    that cannot get either within its timeout does not start (fail closed).

    Discovery and policy come from Consul when ``CONSUL_HTTP_ADDR`` is set (the compose stack:
    the service registers itself with a health check, finds peers among passing instances and
    watches its policy in KV), else from ``infra/registry.json`` and ``infra/policy.json``.
    Either way the registry file gives this service's own listen address (the port plan).
    """
    consul = load_settings(ConsulSettings)
    plan = FileRegistry(settings.registry)
    address = plan.lookup(name)
    registry: ServiceRegistry = plan
    policy_source: Path | PolicySource = settings.policy
    consul_policy: ConsulPolicySource | None = None
    registration: ConsulRegistration | None = None
    # Whatever raises below closes what was made before it, newest first. The audit log comes
    # first so that it closes last: a watcher may still record a decision while it stops.
    with ExitStack() as resources:
        audit = AuditLog(settings.home / "audit" / f"{name}.jsonl", fsync=settings.audit_fsync)
        resources.callback(audit.close)
        if consul.enabled:
            registry = ConsulRegistry(consul.client())
            consul_policy = consul.policy_source().start()
            resources.callback(consul_policy.close)
            policy_source = consul_policy
        policy = Policy(policy_source, settings.trust_domain)
        source = SvidSource(
            settings.workload_endpoint(name),
            settings.trust_domain,
            timeout=settings.svid_timeout_seconds,
        )
        resources.callback(source.close)
        revocation = RevocationWatcher(
            f"{settings.issuer_url}/crls",
            lambda: source.current().bundle,
            interval=settings.revocation_interval_seconds,
        )
        resources.callback(revocation.close)
        revocation.start()
        revocation.wait_ready(settings.revocation_timeout_seconds)
        if consul.enabled:
            registration = ConsulRegistration.register(
                consul.client(), address, consul.advertised(address.host)
            )
            resources.callback(registration.close)
        verifier = PeerVerifier(source.current, settings.trust_domain, revocation=revocation)
        telemetry = setup_telemetry(
            name,
            metrics_port=address.metrics_port,
            metrics_host=address.host,
            spans_path=settings.home / "telemetry" / f"{name}-spans.jsonl",
            svid=source.current,
            revocation=revocation,
        )
        resources.callback(telemetry.shutdown)
        readiness = ServiceHealth(name)
        readiness.require("svid", lambda: svid_problem(source.current()))
        readiness.require("revocation", revocation.problem)
        readiness.require("policy", policy.problem)
        readiness.require("audit", audit.problem)
        resources.callback(HealthSocket(health_socket(settings.home, name), readiness).close)
        return ServiceRuntime(
            name=name,
            settings=settings,
            address=address,
            source=source,
            revocation=revocation,
            verifier=verifier,
            policy=policy,
            audit=audit,
            telemetry=telemetry,
            registry=registry,
            health=readiness,
            consul_registration=registration,
            consul_policy=consul_policy,
            resources=resources.pop_all(),
        )


def create_grpc_server(
    runtime: ServiceRuntime, health_servicer: grpc_health.aio.HealthServicer
) -> grpc.aio.Server:
    """A grpc.aio server on the registry address with mTLS, authorization and
    ``health_servicer``; made on the running event loop (the server belongs to it).

    The caller adds its servicers, then ``start()``s it.
    """
    interceptor = AuthorizationInterceptor(
        service=runtime.name,
        verifier=runtime.verifier,
        policy=runtime.policy,
        audit=runtime.audit,
        telemetry=runtime.telemetry,
        local_address=runtime.address.target,
    )
    # No SO_REUSEPORT (grpcio's default): a second process on a taken port would share its
    # connections silently rather than fail.
    server = grpc.aio.server(interceptors=[interceptor], options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        server.add_secure_port(runtime.address.target, server_credentials(runtime.source))
    except RuntimeError:  # grpcio's only word for it: "Failed to bind to address ..."
        raise ListenError(
            f"cannot listen on {runtime.address.target}: the port is in use, or the address"
            " is not this machine's"
        ) from None
    return server


@dataclass
class GrpcService:
    """A gRPC service ready to serve: its runtime, how to add its servicers to the server, and
    the client channels it calls through (closed after the server stopped)."""

    runtime: ServiceRuntime
    register: Callable[[grpc.aio.Server], None]
    channels: tuple[MtlsChannel, ...] = ()

    async def serve(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain calls in flight and close the channels."""
        health_servicer = grpc_health.aio.HealthServicer()
        server = create_grpc_server(self.runtime, health_servicer)
        self.register(server)
        await server.start()

        async def serving(ready: bool) -> None:
            status = SERVING if ready else NOT_SERVING
            for service in ("", self.runtime.name):  # the server as a whole, and by name
                await health_servicer.set(service, status)

        watch = asyncio.create_task(keep_watch(self.runtime.health, serving))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        logger.info(
            "%s serving on %s as %s",
            self.runtime.name,
            self.runtime.address.target,
            self.runtime.source.current().spiffe_id,
        )
        try:
            await stop.wait()
            await server.stop(grace=5)
        finally:
            watch.cancel()
            for channel in self.channels:
                await channel.aclose()

    def run(self) -> None:
        try:
            asyncio.run(self.serve())
        finally:
            self.runtime.close()
