"""The issuer's admin API: entries, minting, revocation and status, for the issuer's own uid (or
root)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminBase
from services.common.files import private_key_pem
from services.common.identity.pem import certificates_to_pem, serial_hex
from services.issuer.adapters.attestation import PeerCredentials
from services.issuer.domain.entries import Entry
from services.issuer.domain.revocation import RevocationResult
from services.issuer.domain.service import IssuerService
from services.issuer.errors import (
    AlreadyRevokedError,
    EntryError,
    IssuerError,
    MintError,
    NotRevokedError,
    RevocationError,
    RevokedIdentityError,
    UnknownSerialError,
)
from services.issuer.transport.grpc_peer import stream_credentials

# What a caller of another uid is told (the admin API can mint any identity of the domain).
ADMIN_REFUSAL = "admin API is for the issuer's own user"


def _entry_message(entry: Entry) -> pb.Entry:
    return pb.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        selectors=sorted(str(s) for s in entry.selectors),
        ttl_seconds=int(entry.ttl.total_seconds()) if entry.ttl else 0,
        dns_names=list(entry.dns_names),
        created_at=entry.created_at.isoformat(timespec="seconds"),
    )


def _ttl(seconds: int) -> timedelta | None:
    return timedelta(seconds=seconds) if seconds else None


class AdminApi(IssuerAdminBase):
    def __init__(
        self,
        service: IssuerService,
        *,
        on_change: Callable[[], None],
        status: Callable[[], pb.StatusResponse],
        on_revoke: Callable[[], int] = lambda: 0,
        on_renew: Callable[[], None] = lambda: None,
        on_refused: Callable[[PeerCredentials, str], None] = lambda _peer, _method: None,
    ) -> None:
        """``on_change`` after entries change or a revocation is lifted; ``on_revoke`` after a
        revocation: re-issues the CRLs, wakes the Workload API streams and returns the highest
        CRL number."""
        self._service = service
        self._on_change = on_change
        self._status = status
        self._on_revoke = on_revoke
        self._on_renew = on_renew
        self._on_refused = on_refused

    def _authorize(self, stream: Any, method: str) -> None:
        # The socket is 0600 in a 0700 directory; the uid check is the second lock on the door.
        creds = stream_credentials(stream)
        if creds.uid not in (0, os.getuid()):
            self._on_refused(creds, method)
            raise GRPCError(Status.PERMISSION_DENIED, ADMIN_REFUSAL)

    async def CreateEntry(self, stream: Any) -> None:  # noqa: N802 - generated interface
        self._authorize(stream, "CreateEntry")
        request = await stream.recv_message()
        try:
            entry = self._service.create_entry(
                request.spiffe_id,
                list(request.selectors),
                ttl=_ttl(request.ttl_seconds),
                dns_names=list(request.dns_names),
            )
        except EntryError as error:
            raise GRPCError(Status.INVALID_ARGUMENT, str(error)) from None
        self._on_change()
        await stream.send_message(_entry_message(entry))

    async def ListEntries(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "ListEntries")
        await stream.recv_message()
        entries = [_entry_message(e) for e in self._service.entries()]
        await stream.send_message(pb.ListEntriesResponse(entries=entries))

    async def DeleteEntry(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "DeleteEntry")
        request = await stream.recv_message()
        try:
            self._service.delete_entry(request.id)
        except EntryError as error:
            raise GRPCError(Status.NOT_FOUND, str(error)) from None
        self._on_change()
        await stream.send_message(pb.DeleteEntryResponse())

    async def MintX509SVID(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "MintX509SVID")
        request = await stream.recv_message()
        try:
            svid = self._service.mint(
                request.spiffe_id,
                ttl=_ttl(request.ttl_seconds),
                dns_names=list(request.dns_names),
            )
        except MintError as error:
            raise GRPCError(Status.INVALID_ARGUMENT, str(error)) from None
        except RevokedIdentityError as error:
            raise GRPCError(Status.FAILED_PRECONDITION, str(error)) from None
        except IssuerError as error:
            raise GRPCError(Status.UNAVAILABLE, str(error)) from None
        await stream.send_message(
            pb.MintX509SVIDResponse(
                chain_pem=certificates_to_pem(svid.chain),
                key_pem=private_key_pem(svid.key),
                bundle_pem=certificates_to_pem(self._service.authority.bundle()),
                serial=serial_hex(svid.leaf),
                not_after=svid.leaf.not_valid_after_utc.isoformat(timespec="seconds"),
            )
        )

    async def Revoke(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "Revoke")
        request = await stream.recv_message()
        try:
            result = self._revoke(request)
        except (UnknownSerialError, NotRevokedError) as error:
            raise GRPCError(Status.NOT_FOUND, str(error)) from None
        except AlreadyRevokedError as error:
            raise GRPCError(Status.ALREADY_EXISTS, str(error)) from None
        except RevocationError as error:
            raise GRPCError(Status.INVALID_ARGUMENT, str(error)) from None
        if request.undo:
            self._on_change()
            crl_number = 0
        else:
            crl_number = self._on_revoke()
        await stream.send_message(
            pb.RevokeResponse(
                serials=list(result.serials),
                spiffe_id=result.spiffe_id,
                reason=result.reason,
                revoked_at=result.at.isoformat(timespec="seconds"),
                replaced=list(result.replaced),
                crl_number=crl_number,
                undone=request.undo,
            )
        )

    def _revoke(self, request: pb.RevokeRequest) -> RevocationResult:
        if bool(request.serial) == bool(request.spiffe_id):
            raise RevocationError("give either a serial or a SPIFFE ID to revoke")
        if request.undo:
            if not request.spiffe_id:
                raise RevocationError("only a SPIFFE ID's revocation can be lifted, not a serial's")
            return self._service.lift_revocation(request.spiffe_id)
        if request.serial:
            return self._service.revoke_serial(request.serial, request.reason)
        return self._service.revoke_spiffe_id(request.spiffe_id, request.reason)

    async def Status(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "Status")
        await stream.recv_message()
        await stream.send_message(self._status())

    async def RenewCA(self, stream: Any) -> None:  # noqa: N802
        self._authorize(stream, "RenewCA")
        await stream.recv_message()
        self._on_renew()
        await stream.send_message(pb.RenewCAResponse())
