"""Peer credentials of a grpclib stream on a unix socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from services.issuer.adapters.attestation import (
    PeerCredentials,
    peer_credentials,
    peer_pidfd,
)


def _unix_socket(stream: Any) -> socket.socket:
    # grpclib has no public accessor for the connection's socket; its Peer wraps the transport.
    sock = stream.peer._transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise GRPCError(Status.PERMISSION_DENIED, "peer credentials unavailable")
    # asyncio hands out a TransportSocket wrapper; getsockopt passes through.
    return sock  # type: ignore[no-any-return]


def stream_credentials(stream: Any) -> PeerCredentials:
    return peer_credentials(_unix_socket(stream))


@contextmanager
def stream_peer(stream: Any) -> Iterator[tuple[PeerCredentials, int | None]]:
    """The peer's kernel credentials and a pidfd of its process (closed on exit)."""
    sock = _unix_socket(stream)
    creds = peer_credentials(sock)
    pidfd = peer_pidfd(sock, creds.pid)
    try:
        yield creds, pidfd
    finally:
        if pidfd is not None:
            os.close(pidfd)
