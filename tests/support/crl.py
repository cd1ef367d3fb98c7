"""The issuer's ``GET /crls`` for tests: CRLs built with cryptography, served by a tiny local
HTTP server in a thread, and a clock the tests can move forward."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from services.common.revocation import RevocationWatcher
from tests.support.pki import Issued

# The default SVID TTL of the tests, which the issuer also uses as CRL validity.
CRL_VALIDITY = timedelta(seconds=20)


def build_crl(
    ca: Issued,
    revoked: Iterable[x509.Certificate | int] = (),
    *,
    number: int = 1,
    this_update: datetime | None = None,
    validity: timedelta = CRL_VALIDITY,
    next_update: datetime | None = None,
    reason: x509.ReasonFlags | None = x509.ReasonFlags.key_compromise,
) -> x509.CertificateRevocationList:
    """A CRL of ``ca`` listing ``revoked`` (certificates or serial numbers)."""
    start = this_update or datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(start)
        .next_update(next_update or start + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for item in revoked:
        serial = item if isinstance(item, int) else item.serial_number
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca.key, hashes.SHA256())


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    return b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)


class CrlServer:
    """``GET /crls`` answering whatever was last ``publish``-ed; ``status`` other than 200
    plays a broken issuer, ``stop`` an unreachable one (connection refused) until ``start``."""

    def __init__(self) -> None:
        self.body = b""
        self.status = 200
        self.requests = 0
        self.not_modified = 0  # answers 304 to an If-None-Match of the current ETag, as ours
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if self.path != "/crls":
                    self.send_error(404)
                    return
                body = server.body
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                if server.status == 200 and self.headers.get("If-None-Match") == etag:
                    server.not_modified += 1
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(server.status)
                self.send_header("Content-Type", "application/x-pem-file")
                self.send_header("Content-Length", str(len(body)))
                if server.status == 200:
                    self.send_header("ETag", etag)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        httpd.daemon_threads = True
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/crls"

    def publish(self, *crls: x509.CertificateRevocationList) -> None:
        self.body = crl_pem(*crls)
        self.status = 200

    def stop(self) -> None:
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None


@contextmanager
def crl_server() -> Iterator[CrlServer]:
    server = CrlServer()
    try:
        yield server
    finally:
        server.stop()


class Clock:
    """Wall-clock time plus an offset the test moves forward (``RevocationWatcher(clock=)``)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate()`` until it is truthy or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def started_watcher(
    server: CrlServer,
    bundle: Iterable[x509.Certificate],
    *,
    interval: float = 0.05,
    clock: Clock | None = None,
) -> RevocationWatcher:
    """A running watcher of ``server`` that has verified its first CRLs."""
    certificates = tuple(bundle)
    watcher = RevocationWatcher(
        server.url, lambda: certificates, interval=interval, clock=clock or Clock()
    )
    watcher.start()
    watcher.wait_ready(5.0)
    return watcher
