"""One authorization decision, as the HTTPS and gRPC guards both report it: an audit record
and a count in the ``authz_decisions`` metric."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from services.common.authz.audit import AuditLog, AuditRecord
from services.common.mtls.peer import PeerIdentity
from services.common.observability.telemetry import Telemetry, current_trace_id

Endpoint = tuple[str, int | None]  # (host, port); port None when unknown

TLS_HANDSHAKE_EVENT = "tls_handshake"
AUTHZ_EVENT = "authz"
# A request the policy allowed, refused by the service itself (an idempotency key used for
# another body, a customer token that does not own the account): the refusal's own record.
REFUSAL_EVENT = "request_refused"


@dataclass(frozen=True)
class TlsFacts:
    """What one TLS connection showed of itself; None where the transport cannot tell (grpcio
    exposes no cipher, ALPN or connection ID; a refused handshake leaves no SNI or ALPN)."""

    version: str | None = None
    cipher: str | None = None
    cipher_code: str | None = None
    sni: str | None = None
    alpn: str | None = None
    session_id: str | None = None
    # The client certificate's subject, when the connection's peer was not verified (a
    # verified peer carries its own).
    subject: str | None = None
    handshake: str = "success"


NO_TLS_FACTS = TlsFacts()


@dataclass(frozen=True)
class ConnectionFacts:
    """Who called whom, and over what TLS: what a decision's record tells of the connection it
    was made on.  An address is None where the transport does not know it."""

    client: Endpoint | None
    server: Endpoint | None
    tls: TlsFacts


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
    tls: TlsFacts = NO_TLS_FACTS,
    event: str = AUTHZ_EVENT,
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
            tls_version=tls.version,
            cipher=tls.cipher,
            service=service,
            method=method,
            decision=decision,
            reason=reason,
            trace_id=current_trace_id(),
            event=event,
            cipher_code=tls.cipher_code,
            sni=tls.sni,
            alpn=tls.alpn,
            session_id=tls.session_id,
            cert_subject=peer.subject if peer and peer.subject else tls.subject,
            handshake=tls.handshake,
        )
    )


@dataclass(frozen=True)
class DecisionRecorder:
    """Where one server's decisions go: counted and audited under its service name.  The HTTPS
    guard and the gRPC interceptor both hold one, so that a decision is reported the same way
    whichever transport made it."""

    service: str
    audit: AuditLog
    telemetry: Telemetry

    def submit(
        self,
        connection: ConnectionFacts,
        peer: PeerIdentity | None,
        method: str,
        decision: str,
        reason: str,
        *,
        event: str = AUTHZ_EVENT,
    ) -> Future[None]:
        """Count the decision and queue its record; the future completes once it is on disk.
        The event loop awaits it with ``asyncio.wrap_future``, serving others meanwhile."""
        return submit_decision(
            self.audit,
            self.telemetry,
            service=self.service,
            peer=peer,
            method=method,
            decision=decision,
            reason=reason,
            source=connection.client or ("", None),
            dest=connection.server or ("", None),
            tls=connection.tls,
            event=event,
        )
