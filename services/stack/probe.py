"""Health and served-SVID probes of the bank services: the service's own readiness from its local
health socket, then its served SVID and health over mTLS as the ``ops`` identity."""

from __future__ import annotations

import re
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.discovery.registry import ServiceAddress
from services.common.errors import CommonError
from services.common.identity.pem import load_der_certificates, serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_der_chain
from services.common.mtls.contexts import client_context
from services.common.runtime.health import HealthAnswer, HealthUnavailableError, read_health

PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class ServiceProbe:
    name: str
    spiffe_id: str
    url: str
    svid_serial: str | None
    svid_not_after: str | None
    healthy: bool
    error: str | None = None
    svid_not_before: str | None = None
    # What the service says of itself on its health socket; None: the socket did not answer.
    ready: bool | None = None
    reasons: tuple[str, ...] = ()


def _served_certificate(
    address: ServiceAddress, material: SvidMaterial, alpn: list[str], expected: SpiffeId
) -> tuple[x509.Certificate, bytes]:
    """Handshake, check the server's SPIFFE ID, return its certificate and raw socket reply."""
    context = client_context(material, alpn)
    with (
        socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise CommonError("server sent no certificate")
        spiffe_id = verify_der_chain([der], material.bundle, trust_domain=expected.trust_domain)
        if spiffe_id != expected:
            raise CommonError(f"server is {spiffe_id}, expected {expected}")
        reply = b""
        if alpn == ["http/1.1"]:
            request = f"GET /readyz HTTP/1.1\r\nHost: {address.host}\r\nConnection: close\r\n\r\n"
            tls.sendall(request.encode())
            reply = tls.recv(4096)
    return load_der_certificates(der)[0], reply


def _grpc_healthy(address: ServiceAddress, material: SvidMaterial) -> bool:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=material.bundle_pem,
        private_key=material.key_pem,
        certificate_chain=material.chain_pem,
    )
    options = [("grpc.ssl_target_name_override", address.name)]
    with grpc.secure_channel(address.target, credentials, options=options) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the generated methods
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _own_word(health_socket: Path | None) -> HealthAnswer | None:
    if health_socket is None:
        return None
    try:
        return read_health(health_socket, timeout=PROBE_TIMEOUT)
    except HealthUnavailableError:
        return None


def probe(
    address: ServiceAddress,
    expected: SpiffeId,
    material: SvidMaterial,
    *,
    https: bool,
    health_socket: Path | None = None,
) -> ServiceProbe:
    """Healthy: the service says it is ready (on ``health_socket``, when it answers), serves
    ``expected``'s SVID, and answers its health check over mTLS.  Not ready, its own reasons
    are the error: they say why, where an mTLS failure would only say that it failed."""
    url = f"https://{address.target}" if https else address.target
    own = _own_word(health_socket)
    ready, reasons = (None, ()) if own is None else (own.ok, own.reasons)
    not_ready = None if own is None or own.ok else "not ready: " + "; ".join(own.reasons)
    try:
        leaf, reply = _served_certificate(
            address, material, ["http/1.1"] if https else ["h2"], expected
        )
        answers = reply.startswith(b"HTTP/1.1 200") if https else _grpc_healthy(address, material)
    except (OSError, CommonError, grpc.RpcError) as error:
        return ServiceProbe(
            address.name,
            str(expected),
            url,
            None,
            None,
            False,
            not_ready or str(error),
            ready=ready,
            reasons=reasons,
        )
    return ServiceProbe(
        address.name,
        str(expected),
        url,
        serial_hex(leaf),
        leaf.not_valid_after_utc.isoformat(),
        answers and not_ready is None,
        not_ready or (None if answers else "its health check answered: not serving"),
        svid_not_before=leaf.not_valid_before_utc.isoformat(),
        ready=ready,
        reasons=reasons,
    )


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(address: ServiceAddress, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of a Prometheus metric from the service's metrics port (the address's host):
    its labels and value; [] when it has no such port, does not answer, or lacks the metric."""
    if address.metrics_port is None:
        return []
    url = f"http://{address.host}:{address.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as reply:
            text = reply.read().decode()
    except OSError:
        return []
    samples = []
    for line in text.splitlines():
        if (found := _SAMPLE.match(line)) and found[1] == name:
            samples.append((dict(_LABEL.findall(found[2] or "")), float(found[3])))
    return samples


def metric_sample(address: ServiceAddress, name: str) -> float | None:
    """The first sample of a Prometheus metric (see ``metric_samples``), None without one."""
    samples = metric_samples(address, name)
    return samples[0][1] if samples else None
