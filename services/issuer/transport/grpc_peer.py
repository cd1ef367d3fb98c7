"""Peer credentials of a grpclib stream on a unix socket."""

from __future__ import annotations

import socket
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from services.issuer.adapters.attestation import PeerCredentials, peer_credentials


def stream_credentials(stream: Any) -> PeerCredentials:
    # grpclib has no public accessor for the connection's socket; its Peer wraps the transport.
    transport = stream.peer._transport
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise GRPCError(Status.PERMISSION_DENIED, "peer credentials unavailable")
    return peer_credentials(sock)
