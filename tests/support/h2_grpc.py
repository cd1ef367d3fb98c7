"""One unary gRPC call over a TLS socket the test made itself (Python's ssl, HTTP/2 by ``h2``).

grpcio keeps its TLS to itself: a test cannot offer a captured TLS session with it, nor present
a certificate its BoringSSL refuses to load.  This client speaks just enough gRPC over an
``ssl.SSLSocket`` of the caller's making: one request, the status and message of the answer.
"""

from __future__ import annotations

import ssl
import struct
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

READ_SIZE = 65536


@dataclass
class GrpcReply:
    """The answer to one call: ``status`` None if the connection ended before a status came."""

    status: int | None = None  # grpc-status (0 OK, 16 UNAUTHENTICATED, ...)
    message: str = ""  # grpc-message, percent-decoded
    body: bytes = b""  # the response message(s), with their 5-byte gRPC prefixes
    headers: dict[str, str] = field(default_factory=dict)  # response headers and trailers
    ended: str = ""  # "stream ended", "connection terminated (GOAWAY)" or "connection closed"

    @property
    def message_bytes(self) -> bytes:
        """The first response message without its gRPC prefix."""
        if len(self.body) < 5:
            return b""
        (length,) = struct.unpack("!I", self.body[1:5])
        return self.body[5 : 5 + length]


def unary_call(
    tls: ssl.SSLSocket, authority: str, method: str, request: bytes, *, timeout: float = 10.0
) -> GrpcReply:
    """Call ``method`` (``/package.Service/Method``) with the serialized ``request`` on ``tls``
    (ALPN h2, handshake done) and read until the call's stream ends or the connection does."""
    tls.settimeout(timeout)
    connection = h2.connection.H2Connection(
        config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    connection.initiate_connection()
    stream = connection.get_next_available_stream_id()
    connection.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", method),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    framed = b"\x00" + struct.pack("!I", len(request)) + request  # not compressed, length
    connection.send_data(stream, framed, end_stream=True)
    reply = GrpcReply()
    try:
        tls.sendall(connection.data_to_send())
        while not reply.ended:
            data = tls.recv(READ_SIZE)
            if not data:
                break
            for event in connection.receive_data(data):
                _apply(connection, stream, event, reply)
            tls.sendall(connection.data_to_send())
    except (ConnectionError, ssl.SSLEOFError):
        pass  # the server closed the connection: said by ``ended``
    reply.ended = reply.ended or "connection closed"
    return reply


def _apply(
    connection: h2.connection.H2Connection, stream: int, event: h2.events.Event, reply: GrpcReply
) -> None:
    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
        if event.stream_id == stream:
            for name, value in event.headers or []:
                reply.headers[str(name)] = str(value)
            if "grpc-status" in reply.headers:
                reply.status = int(reply.headers["grpc-status"])
                reply.message = urllib.parse.unquote(reply.headers.get("grpc-message", ""))
    elif isinstance(event, h2.events.DataReceived):
        if event.stream_id == stream and event.data:
            reply.body += event.data
        connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id or 0)
    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
        reply.ended = "stream ended"
    elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
        reply.ended = f"stream reset ({event.error_code!r})"
    elif isinstance(event, h2.events.ConnectionTerminated):
        reply.ended = "connection terminated (GOAWAY)"
