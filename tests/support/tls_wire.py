"""TLS on the wire, for tests that must see what a SERVER did rather than what a client library
chose to offer.

``client_hello`` builds a ClientHello byte by byte: any legacy version (TLS 1.0, 1.1) and any
cipher suites (CBC, SHA-1), which the platform's OpenSSL may refuse to put in a ClientHello at
its security level.  ``exchange`` sends it over a plain TCP socket and reads the server's answer
record by record until the server has either answered (a ServerHello: the version and suite it
chose) or refused (an alert record: level and description) or closed the connection saying
nothing.  The handshake goes no further: no key exchange, nothing encrypted.

``received_alert`` reads the alert off an ``ssl.SSLError`` when a real handshake was made with
``ssl`` (TLS 1.3 encrypts alerts, so only the TLS library can read them): OpenSSL names an
alert it RECEIVED ``SSLV3_ALERT_*``, ``TLSV1_ALERT_*``, ``TLSV13_ALERT_*`` (and a few
``TLSV1_*``), never a failure of its own, so a client-side refusal cannot pass for the server's.
``handshake_and_listen`` makes such a handshake and reports what the server did next.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from tests.support import pki

RECORD_HEADER = 5
MAX_RECORD = 16384 + 2048


class Version(IntEnum):
    TLS1_0 = 0x0301
    TLS1_1 = 0x0302
    TLS1_2 = 0x0303


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    """RFC 8446 section 6 (and RFC 5246 for the ones TLS 1.3 retired)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    NO_CERTIFICATE = 41
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    CERTIFICATE_UNOBTAINABLE = 111
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    BAD_CERTIFICATE_HASH_VALUE = 114
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


@dataclass(frozen=True)
class Alert:
    level: AlertLevel
    description: AlertDescription

    def __str__(self) -> str:
        return f"{self.level.name.lower()} {self.description.name.lower()}({self.description})"


# Cipher suites by IANA code (the OpenSSL name in the comment).
ECDHE_ECDSA_AES128_GCM_SHA256 = 0xC02B  # ECDHE-ECDSA-AES128-GCM-SHA256 (AEAD)
ECDHE_ECDSA_AES128_CBC_SHA256 = 0xC023  # ECDHE-ECDSA-AES128-SHA256 (CBC)
ECDHE_ECDSA_AES128_CBC_SHA = 0xC009  # ECDHE-ECDSA-AES128-SHA (CBC, SHA-1)
ECDHE_ECDSA_AES256_CBC_SHA = 0xC00A  # ECDHE-ECDSA-AES256-SHA (CBC, SHA-1)
ECDHE_RSA_AES128_CBC_SHA = 0xC013  # ECDHE-RSA-AES128-SHA (CBC, SHA-1)
ECDHE_RSA_AES256_CBC_SHA = 0xC014  # ECDHE-RSA-AES256-SHA (CBC, SHA-1)
RSA_AES128_CBC_SHA = 0x002F  # AES128-SHA (RSA key exchange, CBC, SHA-1)
RSA_AES256_CBC_SHA = 0x0035  # AES256-SHA (RSA key exchange, CBC, SHA-1)
# What a TLS 1.0/1.1 client of the last decade offered: every one of them is CBC with SHA-1.
LEGACY_SUITES = (
    ECDHE_ECDSA_AES128_CBC_SHA,
    ECDHE_ECDSA_AES256_CBC_SHA,
    ECDHE_RSA_AES128_CBC_SHA,
    ECDHE_RSA_AES256_CBC_SHA,
    RSA_AES128_CBC_SHA,
    RSA_AES256_CBC_SHA,
)

# supported_groups: x25519, secp256r1, secp384r1
DEFAULT_GROUPS = (0x001D, 0x0017, 0x0018)
# signature_algorithms: ecdsa_secp256r1_sha256, ecdsa_secp384r1_sha384, rsa_pss_rsae_sha256,
# rsa_pkcs1_sha256, rsa_pss_rsae_sha384, rsa_pkcs1_sha384
DEFAULT_SIGNATURE_ALGORITHMS = (0x0403, 0x0503, 0x0804, 0x0401, 0x0805, 0x0501)

_EXT_SERVER_NAME = 0x0000
_EXT_SUPPORTED_GROUPS = 0x000A
_EXT_EC_POINT_FORMATS = 0x000B
_EXT_SIGNATURE_ALGORITHMS = 0x000D
_EXT_ALPN = 0x0010
_EXT_RENEGOTIATION_INFO = 0xFF01
_HANDSHAKE_CLIENT_HELLO = 1
_HANDSHAKE_SERVER_HELLO = 2


def _u8_prefixed(data: bytes) -> bytes:
    return struct.pack("!B", len(data)) + data


def _u16_prefixed(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def _u16s(values: Sequence[int]) -> bytes:
    return b"".join(struct.pack("!H", value) for value in values)


def _extension(kind: int, body: bytes) -> bytes:
    return struct.pack("!H", kind) + _u16_prefixed(body)


def client_hello(
    version: Version,
    suites: Sequence[int],
    *,
    server_name: str | None = None,
    alpn: Sequence[str] = (),
    groups: Sequence[int] = DEFAULT_GROUPS,
    signature_algorithms: Sequence[int] = DEFAULT_SIGNATURE_ALGORITHMS,
) -> bytes:
    """One TLS record holding a ClientHello for ``version`` that offers exactly ``suites``.

    No supported_versions extension: the server sees ``version`` and nothing newer, as from a
    client that speaks nothing newer.  signature_algorithms only exists from TLS 1.2 on.
    """
    extensions = [
        _extension(_EXT_SUPPORTED_GROUPS, _u16_prefixed(_u16s(groups))),
        _extension(_EXT_EC_POINT_FORMATS, _u8_prefixed(b"\x00")),  # uncompressed
        _extension(_EXT_RENEGOTIATION_INFO, b"\x00"),  # an initial handshake
    ]
    if server_name is not None:
        name = server_name.encode("ascii")
        entry = b"\x00" + _u16_prefixed(name)  # host_name
        extensions.append(_extension(_EXT_SERVER_NAME, _u16_prefixed(entry)))
    if version >= Version.TLS1_2:
        extensions.append(
            _extension(_EXT_SIGNATURE_ALGORITHMS, _u16_prefixed(_u16s(signature_algorithms)))
        )
    if alpn:
        names = b"".join(_u8_prefixed(protocol.encode("ascii")) for protocol in alpn)
        extensions.append(_extension(_EXT_ALPN, _u16_prefixed(names)))
    body = (
        struct.pack("!H", version)
        + os.urandom(32)  # random
        + _u8_prefixed(b"")  # no session ID: nothing to resume
        + _u16_prefixed(_u16s(suites))
        + _u8_prefixed(b"\x00")  # compression: null only
        + _u16_prefixed(b"".join(extensions))
    )
    handshake = struct.pack("!B", _HANDSHAKE_CLIENT_HELLO) + len(body).to_bytes(3, "big") + body
    # The record layer says TLS 1.0 whatever the hello offers, as real clients do.
    return struct.pack("!BHH", ContentType.HANDSHAKE, Version.TLS1_0, len(handshake)) + handshake


@dataclass(frozen=True)
class Record:
    content_type: int
    version: int
    payload: bytes


@dataclass(frozen=True)
class ServerHello:
    version: int  # the legacy version field: the version chosen for TLS 1.2 and older
    cipher_suite: int


@dataclass
class ServerAnswer:
    """What the server sent back to one ClientHello, as read off the socket."""

    local_port: int  # the client's end of the connection, as the server's records name it
    records: list[Record] = field(default_factory=list)
    # How the reading ended: "alert", "server hello", "eof" (the server closed the connection),
    # or "reset" (it reset it).
    ended: str = ""
    trailing: bytes = b""  # bytes after the last whole record, if the server closed mid-record

    @property
    def alert(self) -> Alert | None:
        """The first alert record, if the server sent one (before any encryption)."""
        for record in self.records:
            if record.content_type == ContentType.ALERT and len(record.payload) == 2:
                return Alert(AlertLevel(record.payload[0]), AlertDescription(record.payload[1]))
        return None

    @property
    def server_hello(self) -> ServerHello | None:
        messages = b"".join(
            r.payload for r in self.records if r.content_type == ContentType.HANDSHAKE
        )
        if len(messages) < 4 or messages[0] != _HANDSHAKE_SERVER_HELLO:
            return None
        body = messages[4 : 4 + int.from_bytes(messages[1:4], "big")]
        version = int.from_bytes(body[0:2], "big")
        session_id_length = body[34]
        offset = 35 + session_id_length
        return ServerHello(version, int.from_bytes(body[offset : offset + 2], "big"))

    def __str__(self) -> str:
        kinds = ", ".join(f"type {r.content_type} ({len(r.payload)} bytes)" for r in self.records)
        return f"records: [{kinds}], ended: {self.ended}, alert: {self.alert}"


def _read_exactly(sock: socket.socket, count: int, answer: ServerAnswer) -> bytes | None:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            answer.ended, answer.trailing = "reset", data
            return None
        if not chunk:
            answer.ended, answer.trailing = "eof", data
            return None
        data += chunk
    return data


def exchange(host: str, port: int, hello: bytes, *, timeout: float = 10.0) -> ServerAnswer:
    """Send ``hello`` on a new TCP connection and read the server's records until it has
    answered (ServerHello), refused (an alert) or closed the connection.  A server that stays
    silent for ``timeout`` seconds fails the caller with TimeoutError."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        answer = ServerAnswer(int(sock.getsockname()[1]))
        sock.sendall(hello)
        while True:
            header = _read_exactly(sock, RECORD_HEADER, answer)
            if header is None:
                return answer
            content_type, version, length = struct.unpack("!BHH", header)
            if length > MAX_RECORD:
                raise ValueError(f"not a TLS record: {header.hex()}")
            payload = _read_exactly(sock, length, answer)
            if payload is None:
                answer.trailing = header + answer.trailing
                return answer
            answer.records.append(Record(content_type, version, payload))
            if content_type == ContentType.ALERT:
                answer.ended = "alert"
                return answer
            if answer.server_hello is not None:
                answer.ended = "server hello"
                return answer


@dataclass(frozen=True)
class Loopback:
    host: str
    port: int
    certificate_pem: bytes  # the server's self-signed certificate: a client's trust bundle


@contextlib.contextmanager
def loopback_server(
    *, minimum_version: ssl.TLSVersion, ciphers: str, client_ca_pem: bytes | None = None
) -> Iterator[Loopback]:
    """A plain blocking OpenSSL server on 127.0.0.1 with a self-signed ECDSA P-256 certificate,
    speaking ``minimum_version`` and newer with the TLS 1.2 suites ``ciphers`` and, given
    ``client_ca_pem``, requiring a client certificate issued by it: a reference for what
    ``exchange`` and ``handshake_and_listen`` read from a server.  Lenient (TLS 1.0,
    ``ALL:@SECLEVEL=0``) it shows that a ``client_hello`` really offers what it says,
    answering it with a ServerHello of that version and suite; strict, it shows how OpenSSL
    itself refuses: with an alert."""
    issued = pki.create_leaf(None, uri_sans=[], dns_sans=["localhost"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="zte-wire-") as directory:
        cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
        pki.write_pem_files(issued, cert_path=cert, key_path=key)
        context.load_cert_chain(cert, key)
        certificate_pem = cert.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 and 1.1 are deprecated
        context.minimum_version = minimum_version
    context.set_ciphers(ciphers)
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca_pem.decode())
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener is closed: done
                return
            # Refused (OpenSSL sends its alert), or the client left: the connection is over.
            with connection, contextlib.suppress(OSError):  # ssl.SSLError is one
                connection.settimeout(10)
                context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=serve, name="loopback-tls-server", daemon=True)
    thread.start()
    try:
        yield Loopback("127.0.0.1", int(listener.getsockname()[1]), certificate_pem)
    finally:
        # shutdown() wakes the accept() blocked in the thread; close() alone would not.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the loopback server did not stop"


# -- alerts an ssl handshake received ---------------------------------------------------------

# OpenSSL's reason for each alert it RECEIVED (ssl/ssl_err.c, SSL_AD_REASON_OFFSET + the code),
# where it differs from "SSLV3_ALERT_" or "TLSV1_ALERT_" + the RFC's name.
_REASON_NAMES = {
    "TLSV1_ALERT_UNKNOWN_CA": AlertDescription.UNKNOWN_CA,
    "TLSV1_ALERT_NO_RENEGOTIATION": AlertDescription.USER_CANCELED,
    "TLSV1_ALERT_USER_CANCELLED": AlertDescription.USER_CANCELED,
    "TLSV1_UNSUPPORTED_EXTENSION": AlertDescription.UNSUPPORTED_EXTENSION,
    "TLSV1_CERTIFICATE_UNOBTAINABLE": AlertDescription.CERTIFICATE_UNOBTAINABLE,
    "TLSV1_UNRECOGNIZED_NAME": AlertDescription.UNRECOGNIZED_NAME,
    "TLSV1_BAD_CERTIFICATE_STATUS_RESPONSE": AlertDescription.BAD_CERTIFICATE_STATUS_RESPONSE,
    "TLSV1_BAD_CERTIFICATE_HASH_VALUE": AlertDescription.BAD_CERTIFICATE_HASH_VALUE,
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": AlertDescription.CERTIFICATE_REQUIRED,
    "TLSV13_ALERT_MISSING_EXTENSION": AlertDescription.MISSING_EXTENSION,
}
_ALERT_PREFIXES = ("SSLV3_ALERT_", "TLSV1_ALERT_")


def received_alert(error: ssl.SSLError) -> AlertDescription | None:
    """The alert the PEER sent, if that is what ``error`` reports; None for an error of the
    local TLS library (a certificate it refused, an EOF, a protocol error of its own)."""
    reason = error.reason or ""
    if reason in _REASON_NAMES:
        return _REASON_NAMES[reason]
    for prefix in _ALERT_PREFIXES:
        if reason.startswith(prefix):
            name = reason.removeprefix(prefix)
            if name not in AlertDescription.__members__:
                raise ValueError(f"an alert this module does not know: {reason}")
            return AlertDescription[name]
    return None


# -- a real handshake, then what the server did ------------------------------------------------

READ_SIZE = 65536
# The header of an HTTP/2 SETTINGS frame on stream 0: a server that accepted the connection
# starts with one (RFC 9113 section 3.4).
_HTTP2_SETTINGS = 0x04


def starts_with_http2_settings(data: bytes) -> bool:
    return len(data) >= 9 and data[3] == _HTTP2_SETTINGS and data[5:9] == b"\x00\x00\x00\x00"


@dataclass(frozen=True)
class Listened:
    """One connection made with ``ssl``, and what the server did once the handshake was done.

    ``stage``: "handshake" if the client's handshake itself failed (in TLS 1.2 the server
    refuses a client certificate before its Finished), else "after handshake" (in TLS 1.3 a
    client certificate is checked after the client's Finished: its handshake completes first).
    ``ended``: "alert" (the server sent one: ``alert``), "eof" (it closed the connection with
    neither an alert nor a close_notify), "close_notify", "reset", "data" (it sent application
    data: ``data``), "silent" (nothing within the timeout), or "client error <reason>" (the
    local TLS library failed by itself).
    """

    stage: str
    ended: str
    local_port: int
    alert: AlertDescription | None = None
    data: bytes = b""
    version: str | None = None
    error: str = ""

    def __str__(self) -> str:
        alert = f" {self.alert.name.lower()}({self.alert.value})" if self.alert else ""
        data = f" {self.data[:16]!r}" if self.data else ""
        return f"{self.stage}: {self.ended}{alert}{data} [{self.version}] {self.error}".strip()


def _ending(error: ssl.SSLError) -> tuple[str, AlertDescription | None]:
    alert = received_alert(error)
    if alert is not None:
        return "alert", alert
    if isinstance(error, ssl.SSLEOFError) or error.reason == "UNEXPECTED_EOF_WHILE_READING":
        return "eof", None
    return f"client error {error.reason}", None


def handshake_and_listen(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    send: bytes = b"",
    timeout: float = 10.0,
) -> Listened:
    """Connect, handshake with ``context``, send ``send`` (if anything) and read once: what
    did the server do?  EOFs are not suppressed, so a close without close_notify shows."""
    with socket.create_connection((host, port), timeout=timeout) as raw:
        local_port = int(raw.getsockname()[1])
        try:
            tls = context.wrap_socket(
                raw, server_hostname=server_hostname, suppress_ragged_eofs=False
            )
        except ssl.SSLError as error:
            ended, alert = _ending(error)
            return Listened("handshake", ended, local_port, alert, error=str(error))
        except ConnectionResetError as error:
            return Listened("handshake", "reset", local_port, error=str(error))
        with tls:
            version = tls.version()
            try:
                if send:
                    tls.sendall(send)
                data = tls.recv(READ_SIZE)
            except TimeoutError:
                return Listened("after handshake", "silent", local_port, version=version)
            except ssl.SSLError as error:
                ended, alert = _ending(error)
                return Listened(
                    "after handshake", ended, local_port, alert, version=version, error=str(error)
                )
            except ConnectionResetError as error:
                return Listened(
                    "after handshake", "reset", local_port, version=version, error=str(error)
                )
            ended = "data" if data else "close_notify"
            return Listened("after handshake", ended, local_port, data=data, version=version)
