"""The SPIFFE Workload API (gRPC) as served by the issuer, wire-compatible with SPIRE's agent.

Messages are py-spiffe's generated ``workload_pb2`` so that the stock client and this server share
one descriptor; the service has no proto package, as in the SPIFFE spec (``/SpiffeWorkloadAPI/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpclib.const
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from spiffe._proto import workload_pb2

from services.common.identity.pem import certificates_to_der
from services.issuer.adapters.attestation import workload_selectors
from services.issuer.domain.entries import Selector
from services.issuer.domain.jwt_svid import InvalidJwtSvidError
from services.issuer.domain.service import IssuerService
from services.issuer.errors import IssuerError, NotEntitledError
from services.issuer.transport.grpc_peer import stream_peer

logger = logging.getLogger(__name__)

HEADER_KEY, HEADER_VALUE = "workload.spiffe.io", "true"
# Even with nothing to rotate, streams re-check at least this often (seconds).
MAX_IDLE = 30.0


class ChangeFeed:
    """Wakes every waiting stream when entries, the bundle or an SVID change."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def publish(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(seconds, 0.0))


@contextlib.contextmanager
def _issuing_status() -> Iterator[None]:
    """An SVID the issuer will not or cannot make, as the status a SPIRE agent would answer: a
    caller no entry matches is refused for good, any other failure (the upstream CA down, say)
    is worth retrying."""
    try:
        yield
    except NotEntitledError as error:
        raise GRPCError(Status.PERMISSION_DENIED, str(error)) from None
    except IssuerError as error:
        raise GRPCError(Status.UNAVAILABLE, str(error)) from None


class WorkloadApi:
    """One instance per listening socket; ``socket_name`` is set on per-workload sockets."""

    def __init__(
        self,
        service: IssuerService,
        feed: ChangeFeed,
        *,
        socket_name: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._service = service
        self._feed = feed
        self._socket_name = socket_name
        self._clock = clock

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        unary, stream = (
            grpclib.const.Cardinality.UNARY_UNARY,
            grpclib.const.Cardinality.UNARY_STREAM,
        )
        w = workload_pb2
        return {
            "/SpiffeWorkloadAPI/FetchX509SVID": grpclib.const.Handler(
                self.fetch_x509_svid, stream, w.X509SVIDRequest, w.X509SVIDResponse
            ),
            "/SpiffeWorkloadAPI/FetchX509Bundles": grpclib.const.Handler(
                self.fetch_x509_bundles, stream, w.X509BundlesRequest, w.X509BundlesResponse
            ),
            "/SpiffeWorkloadAPI/FetchJWTSVID": grpclib.const.Handler(
                self.fetch_jwt_svid, unary, w.JWTSVIDRequest, w.JWTSVIDResponse
            ),
            "/SpiffeWorkloadAPI/FetchJWTBundles": grpclib.const.Handler(
                self.fetch_jwt_bundles, stream, w.JWTBundlesRequest, w.JWTBundlesResponse
            ),
            "/SpiffeWorkloadAPI/ValidateJWTSVID": grpclib.const.Handler(
                self.validate_jwt_svid, unary, w.ValidateJWTSVIDRequest, w.ValidateJWTSVIDResponse
            ),
        }

    async def _attest(self, stream: Any) -> frozenset[Selector]:
        if stream.metadata.get(HEADER_KEY) != HEADER_VALUE:
            raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
        with stream_peer(stream) as (creds, pidfd):
            selectors = workload_selectors(creds, self._socket_name, pidfd)
        logger.debug("attested pid %s as %s", creds.pid, sorted(map(str, selectors)))
        return selectors

    def _entitled(self, selectors: frozenset[Selector]) -> None:
        try:
            self._service.check_entitled(selectors)
        except NotEntitledError as error:
            raise GRPCError(Status.PERMISSION_DENIED, str(error)) from None

    def _bundle_der(self) -> bytes:
        return certificates_to_der(self._service.authority.bundle())

    @property
    def _td_key(self) -> str:
        return f"spiffe://{self._service.trust_domain}"

    async def fetch_x509_svid(self, stream: Any) -> None:
        selectors = await self._attest(stream)
        await stream.recv_message()
        last: tuple[object, ...] | None = None
        while True:
            changed = self._feed.current()
            with _issuing_status():
                svids = self._service.x509_svids(selectors)
            bundle = self._bundle_der()
            state = (*(s.svid.leaf.serial_number for s in svids), bundle)
            if state != last:
                await stream.send_message(
                    workload_pb2.X509SVIDResponse(
                        svids=[
                            workload_pb2.X509SVID(
                                spiffe_id=str(s.svid.spiffe_id),
                                x509_svid=certificates_to_der(s.svid.chain),
                                x509_svid_key=s.svid.key.private_bytes(
                                    serialization.Encoding.DER,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption(),
                                ),
                                bundle=bundle,
                            )
                            for s in svids
                        ]
                    )
                )
                last = state
            next_rotation = min(s.rotate_at for s in svids)
            await _wait(changed, min((next_rotation - self._clock()).total_seconds(), MAX_IDLE))

    async def fetch_x509_bundles(self, stream: Any) -> None:
        await self._stream_bundle(stream, self._bundle_der, workload_pb2.X509BundlesResponse)

    async def fetch_jwt_bundles(self, stream: Any) -> None:
        await self._stream_bundle(stream, self._service.jwt_bundle, workload_pb2.JWTBundlesResponse)

    async def _stream_bundle(
        self,
        stream: Any,
        current_bundle: Callable[[], bytes],
        response: type[workload_pb2.X509BundlesResponse | workload_pb2.JWTBundlesResponse],
    ) -> None:
        """The trust domain's bundle (X.509 or JWT: the same stream, in two message types) at
        once, then again whenever it changes, for as long as the caller stays entitled."""
        selectors = await self._attest(stream)
        await stream.recv_message()
        last: bytes | None = None
        while True:
            changed = self._feed.current()
            self._entitled(selectors)
            bundle = current_bundle()
            if bundle != last:
                await stream.send_message(response(bundles={self._td_key: bundle}))
                last = bundle
            await _wait(changed, MAX_IDLE)

    async def fetch_jwt_svid(self, stream: Any) -> None:
        selectors = await self._attest(stream)
        request = await stream.recv_message()
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        with _issuing_status():
            svids = self._service.jwt_svids(selectors, list(request.audience), request.spiffe_id)
        await stream.send_message(
            workload_pb2.JWTSVIDResponse(
                svids=[workload_pb2.JWTSVID(spiffe_id=str(i), svid=token) for i, token in svids]
            )
        )

    async def validate_jwt_svid(self, stream: Any) -> None:
        selectors = await self._attest(stream)
        request = await stream.recv_message()
        self._entitled(selectors)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        try:
            spiffe_id, claims = self._service.validate_jwt(request.svid, request.audience)
        except InvalidJwtSvidError as error:
            raise GRPCError(Status.INVALID_ARGUMENT, str(error)) from None
        claims_struct = struct_pb2.Struct()
        claims_struct.update(claims)
        await stream.send_message(
            workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(spiffe_id), claims=claims_struct)
        )
