"""One authorization decision, as the HTTPS and gRPC guards both report it: an audit record
and a count in the ``authz_decisions`` metric."""

from __future__ import annotations

from concurrent.futures import Future

from services.common.audit import AuditLog, AuditRecord
from services.common.peer import PeerIdentity
from services.common.telemetry import Telemetry, current_trace_id

Endpoint = tuple[str, int | None]  # (host, port); port None when unknown


def submit_decision(
    audit: AuditLog,
    telemetry: Telemetry,
    *,
    service: str,
    peer: PeerIdentity | None,
    method: str,
    decision: str,
    reason: str,
    source: Endpoint,
    dest: Endpoint,
    tls_version: str | None = None,
    cipher: str | None = None,
) -> Future[None]:
    """Count the decision and queue its audit record; the future completes once it is on disk
    (threaded servers wait on it, the event loop awaits it)."""
    telemetry.authz_decisions.add(service, decision)
    return audit.submit(
        AuditRecord(
            caller_spiffe_id=str(peer.spiffe_id) if peer else None,
            cert_serial=peer.serial if peer else None,
            cert_sha256=peer.fingerprint_sha256 if peer else None,
            source_addr=source[0],
            source_port=source[1],
            dest_addr=dest[0],
            dest_port=dest[1],
            tls_version=tls_version,
            cipher=cipher,
            service=service,
            method=method,
            decision=decision,
            reason=reason,
            trace_id=current_trace_id(),
        )
    )
