"""Wires the issuer together (``create_issuer``) and runs its listeners (Workload API and admin
sockets, the revocation HTTP endpoint) and the maintenance of its CAs and CRLs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from grpclib.server import Server

from services._proto import issuer_admin_pb2 as pb
from services.common.authz.audit import AuditLog, AuditRecord
from services.common.files import ensure_private_dir
from services.issuer.adapters.attestation import PeerCredentials
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.sqlite_store import SqliteStore
from services.issuer.adapters.upstream.disk import DiskUpstream
from services.issuer.domain.authority import CertificateAuthority
from services.issuer.domain.crl import CrlPublisher
from services.issuer.domain.ocsp import OcspResponder
from services.issuer.domain.service import IssuerService
from services.issuer.domain.upstream import UpstreamAuthority
from services.issuer.errors import IssuerError
from services.issuer.settings import MAX_SVID_TTL, IssuerSettings
from services.issuer.transport.admin_api import ADMIN_REFUSAL, AdminApi
from services.issuer.transport.revocation_http import RevocationEndpoint, create_app
from services.issuer.transport.workload_api import ChangeFeed, WorkloadApi

logger = logging.getLogger(__name__)

MAX_RETRY_DELAY = 30.0
# Issued and revoked certificates are remembered this long after they expire, then pruned.
RECORD_RETENTION = timedelta(days=1)
PRUNE_INTERVAL = timedelta(hours=1)
CRL_RETRY_DELAY = 1.0
# Refusals of the admin API to other uids, under ZTBANK_HOME/audit/.
ADMIN_AUDIT_FILE = "issuer-admin.jsonl"


def build_upstream(settings: IssuerSettings) -> UpstreamAuthority:
    if settings.upstream == "disk":
        return DiskUpstream(settings.certs_dir)
    from services.issuer.adapters.upstream.vault import VaultAuth, VaultUpstream

    if settings.vault_root_ca is None:  # IssuerSettings refuses this; the check narrows the type
        raise IssuerError("ZTBANK_UPSTREAM=vault needs ZTBANK_VAULT_ROOT_CA")
    # AppRole (from its file, or inline) wins over an ambient VAULT_TOKEN.
    if settings.vault_approle_file is not None:
        auth = VaultAuth(
            approle_file=settings.vault_approle_file, approle_mount=settings.vault_approle_mount
        )
    elif settings.vault_role_id or settings.vault_secret_id:
        auth = VaultAuth(
            role_id=settings.vault_role_id,
            secret_id=settings.vault_secret_id,
            approle_mount=settings.vault_approle_mount,
        )
    else:
        auth = VaultAuth(token=settings.vault_token)
    # Only the file's path is kept: the pinned root and the AppRole are re-read at every signing.
    return VaultUpstream(
        settings.vault_addr,
        pki_mount=settings.vault_pki_mount,
        root_mount=settings.vault_root_mount,
        auth=auth,
        ca_cert=settings.vault_cacert,
        pinned_roots_file=settings.vault_root_ca,
    )


def _claim_socket(path: Path) -> None:
    """Remove a stale socket file, but refuse to steal one a live issuer is serving."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise IssuerError(f"another process is already serving {path}")
    finally:
        probe.close()


class Issuer:
    """The running issuer: Workload API sockets, admin socket, revocation endpoint and the
    maintenance loop of CAs and CRLs."""

    def __init__(self, settings: IssuerSettings, upstream: UpstreamAuthority | None = None) -> None:
        self.settings = settings
        ensure_private_dir(settings.state_dir)
        self._store = SqliteStore(settings.state_dir / "issuer.db")
        self._next_prune = datetime.now(UTC)
        self.authority = CertificateAuthority(
            trust_domain=settings.trust_domain,
            upstream=upstream or build_upstream(settings),
            store=AuthorityFile(settings.state_dir / "authority.json"),
            ca_ttl=settings.ca_ttl,
            revocation_url=settings.issuer_url,
        )
        self.service = IssuerService(
            authority=self.authority,
            repository=self._store,
            svid_ttl=settings.svid_ttl,
            max_ttl=MAX_SVID_TTL,
            jwt_svid_ttl=settings.jwt_svid_ttl,
        )
        self.crls = CrlPublisher(
            signers=self.authority, repository=self._store, ttl=settings.crl_validity
        )
        self._ocsp = OcspResponder(
            signers=self.authority, repository=self._store, ttl=settings.crl_validity
        )
        self._http = RevocationEndpoint(create_app(self.crls, self._ocsp), settings.issuer_http)
        self._feed = ChangeFeed()
        self._servers: dict[str | None, tuple[Server, Path]] = {}
        self._admin: Server | None = None
        self._admin_audit: AuditLog | None = None
        self._maintenance: asyncio.Task[None] | None = None
        # Why the last call to the upstream failed (one line), shown by `ztbank status`.
        self.upstream_error = ""
        self.upstream_failures = 0
        self.started = datetime.now(UTC)
        self._wake = asyncio.Event()
        self._retry_now = False

    async def start(self) -> None:
        # The first CA (and its CRL) must exist before any socket answers, or the first fetch
        # would fail; the revocation endpoint is up before the SVIDs that point at it go out.
        await asyncio.to_thread(self.authority.maintain)
        self.crls.refresh()
        await self._http.start()
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        await self._listen(None, self.settings.workload_socket, mode=0o777)
        await self.reconcile_sockets()
        admin_path = self.settings.admin_socket
        ensure_private_dir(admin_path.parent)
        _claim_socket(admin_path)
        self._admin_audit = AuditLog(self.settings.home / "audit" / ADMIN_AUDIT_FILE)
        self._admin = Server(
            [
                AdminApi(
                    self.service,
                    on_change=self._changed,
                    status=self.status,
                    on_revoke=self._revoked,
                    on_renew=self.renew_ca,
                    on_refused=self._admin_refused,
                )
            ]
        )
        await self._admin.start(path=str(admin_path))
        admin_path.chmod(0o600)
        self._maintenance = asyncio.create_task(self._maintain_forever())
        logger.info(
            "issuer ready: trust domain %s, workload API %s, upstream %s, revocation %s",
            self.settings.trust_domain,
            self.settings.workload_socket,
            self.settings.upstream,
            self.settings.issuer_url,
        )

    async def _listen(self, name: str | None, path: Path, *, mode: int) -> None:
        _claim_socket(path)
        server = Server([WorkloadApi(self.service, self._feed, socket_name=name)])
        await server.start(path=str(path))
        # Any local user may connect to the shared socket: attestation, not file mode, decides.
        path.chmod(mode)
        self._servers[name] = (server, path)

    async def reconcile_sockets(self) -> None:
        """Serve a socket for every ``ztbank:socket:NAME`` selector; close the stale ones."""
        wanted = self.service.socket_names()
        for name in wanted - self._servers.keys():
            path = self.settings.workload_socket_for(name)
            ensure_private_dir(path.parent)
            await self._listen(name, path, mode=0o600)
        for name in [n for n in self._servers if n is not None and n not in wanted]:
            server, path = self._servers.pop(name)
            server.close()
            await server.wait_closed()
            path.unlink(missing_ok=True)

    def _changed(self) -> None:
        self._feed.publish()
        asyncio.get_running_loop().create_task(self.reconcile_sockets())

    def _revoked(self) -> int:
        """After a revocation: new CRLs for every CA, and every stream re-checks its SVIDs (a
        revoked ID's streams end, a revoked current SVID is replaced)."""
        self.crls.refresh(force=True)
        self._feed.publish()
        logger.info("revocation recorded; CRLs re-issued up to number %d", self.crls.latest_number)
        return self.crls.latest_number

    def renew_ca(self) -> None:
        """Get the next signing CA from the upstream now, retrying with backoff from 1 s."""
        self.authority.request_renewal()
        self._retry_now = True
        self._wake.set()
        logger.info("renewal of the signing CA requested; asking the upstream now")

    async def _maintain_forever(self) -> None:
        delay = 1.0
        retry_at = 0.0  # monotonic time of the next CA maintenance while it keeps failing
        while True:
            wake = [datetime.now(UTC) + timedelta(seconds=MAX_RETRY_DELAY)]
            if self._retry_now:
                delay, retry_at, self._retry_now = 1.0, 0.0, False
            if time.monotonic() >= retry_at:
                generation = self.authority.generation
                try:
                    wake.append(await asyncio.to_thread(self.authority.maintain))
                except IssuerError as error:
                    self.upstream_error = " ".join(str(error).split())
                    self.upstream_failures += 1
                    logger.error(
                        "CA maintenance failed, retrying in %.0fs: %s", delay, self.upstream_error
                    )
                    retry_at = time.monotonic() + delay
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                else:
                    if self.upstream_error:
                        logger.info("the upstream answered again; CA maintenance is back")
                    self.upstream_error = ""
                    self.upstream_failures = 0
                    delay, retry_at = 1.0, 0.0
                    if self.authority.generation != generation:
                        logger.info("signing CA set changed; pushing the new bundle")
                        self._feed.publish()
            if retry_at:
                wake.append(datetime.now(UTC) + timedelta(seconds=retry_at - time.monotonic()))
            # The CRLs are signed by the current CAs, which need no upstream: they stay fresh
            # through an upstream outage, or every service would fail closed.
            wake.append(self._refresh_crls())
            await asyncio.to_thread(self._prune_records)
            wait = (min(wake) - datetime.now(UTC)).total_seconds()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.05))

    def _prune_records(self) -> None:
        """At most once per PRUNE_INTERVAL; a failure is logged and tried again next time."""
        now = datetime.now(UTC)
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL
        try:
            issued, revoked = self._store.prune_expired(now - RECORD_RETENTION)
        except sqlite3.Error:
            logger.exception("pruning expired certificate records failed")
            return
        if issued or revoked:
            logger.info("pruned %d issued and %d revoked expired certificates", issued, revoked)

    def _refresh_crls(self) -> datetime:
        """Re-sign due CRLs; on any failure log it and retry soon.  This loop must not die: the
        services refuse connections once the CRLs they hold pass nextUpdate."""
        try:
            return self.crls.refresh()
        except Exception:
            logger.exception("re-signing the CRLs failed; retrying in %.0fs", CRL_RETRY_DELAY)
            return datetime.now(UTC) + timedelta(seconds=CRL_RETRY_DELAY)

    def status(self) -> pb.StatusResponse:
        active = self.authority.bundle()
        active_ca = self.authority.active_ca()
        return pb.StatusResponse(
            trust_domain=self.settings.trust_domain,
            upstream=self.settings.upstream,
            workload_socket=str(self.settings.workload_socket),
            active_ca_serial=format(active_ca.serial_number, "x"),
            active_ca_not_after=active_ca.not_valid_after_utc.isoformat(timespec="seconds"),
            entries=len(self.service.entries()),
            bundle_size=len(active),
            revocation_url=self.settings.issuer_url,
            crl_number=self.crls.latest_number,
            revoked_certificates=len(
                self._store.revoked_certificates(unexpired_at=datetime.now(UTC))
            ),
            revoked_spiffe_ids=sorted(r.spiffe_id for r in self.service.revoked_ids()),
            ca_chain=[
                pb.CaCertificate(
                    subject=cert.subject.rfc4514_string(),
                    serial=format(cert.serial_number, "x"),
                    not_after=cert.not_valid_after_utc.isoformat(timespec="seconds"),
                )
                for cert in self.authority.active_chain()
            ],
            upstream_error=self.upstream_error,
            upstream_last_success=(
                signed.isoformat(timespec="seconds")
                if (signed := self.authority.last_signed_at)
                else ""
            ),
            upstream_failures=self.upstream_failures,
            started=self.started.isoformat(timespec="microseconds"),
        )

    def _admin_refused(self, peer: PeerCredentials, method: str) -> None:
        """A process of another uid reached the admin socket (its 0600 mode should have kept it
        out): refused by the uid check, logged and audited."""
        reason = f"{ADMIN_REFUSAL}: uid {peer.uid} (pid {peer.pid}) is not uid {os.getuid()}"
        logger.warning("admin API refused %s: %s", method, reason)
        if self._admin_audit is None:
            return
        record = AuditRecord(
            caller_spiffe_id=None,
            cert_serial=None,
            cert_sha256=None,
            source_addr=f"uid:{peer.uid}",
            source_port=None,
            dest_addr=str(self.settings.admin_socket),
            dest_port=None,
            tls_version=None,
            cipher=None,
            service="issuer",
            method=f"admin {method}",
            decision="deny",
            reason=reason,
            trace_id=None,
            event="admin",
        )
        # Not waited for: the refusal stands whether or not its record can be written.
        self._admin_audit.submit(record)

    async def stop(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
        await self._http.stop()
        servers = [server for server, _ in self._servers.values()]
        if self._admin is not None:
            servers.append(self._admin)
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        for _, path in self._servers.values():
            path.unlink(missing_ok=True)
        self.settings.admin_socket.unlink(missing_ok=True)
        if self._admin_audit is not None:
            self._admin_audit.close()


def create_issuer(settings: IssuerSettings) -> Issuer:
    return Issuer(settings)


async def serve(settings: IssuerSettings, stop: asyncio.Event) -> None:
    issuer = create_issuer(settings)
    await issuer.start()
    try:
        await stop.wait()
    finally:
        await issuer.stop()
