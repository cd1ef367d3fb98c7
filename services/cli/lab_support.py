"""What the labs share: a teller SVID minted for them, and the gateway's audit read back
(native stack, ``ZTBANK_HOME``)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from services._proto import issuer_admin_pb2 as pb
from services.cli.errors import CliError
from services.common.identity.source import SvidMaterial, svid_from_pem
from services.common.tls import pem_client_context
from services.common.workloads import GATEWAY, TELLER
from services.issuer.admin_client import AdminCallError, call_admin
from services.stack.native import StackSettings

Say = Callable[[str], None]  # where a lab narrates, a line at a time
# Signals that end a lab from outside (``kill``, a closed terminal) besides Ctrl-C.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The gateway may write the record of a refused handshake just after the client has seen the
# connection close.
AUDIT_WAIT_SECONDS = 3.0
POLL_SECONDS = 0.05
PRESENT_TIMEOUT = 5.0
ACCOUNTS = "/v1/accounts"


def _last_denial(settings: StackSettings, fields: dict[str, object]) -> str | None:
    path = settings.home / "audit" / f"{GATEWAY.name}.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line still being written
        if record.get("decision") == "deny" and all(record.get(k) == v for k, v in fields.items()):
            return str(record.get("reason"))
    return None


def last_gateway_denial(settings: StackSettings, **fields: object) -> str | None:
    """The reason of the gateway's last deny record with these ``fields`` (e.g. the client's
    ``source_port`` or ``cert_serial``); None if none appears within AUDIT_WAIT_SECONDS."""
    deadline = time.monotonic() + AUDIT_WAIT_SECONDS
    while (reason := _last_denial(settings, fields)) is None and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
    return reason


def mint_teller_svid(settings: StackSettings, ttl_seconds: int) -> SvidMaterial:
    """A teller SVID of its own for a lab client, minted through the issuer's admin API."""
    spiffe_id = str(TELLER.spiffe_id(settings.trust_domain))
    request = pb.MintX509SVIDRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
    try:
        minted = call_admin(settings.admin_socket, lambda stub: stub.MintX509SVID(request))
    except AdminCallError as error:
        raise CliError(f"cannot mint a teller SVID for the lab: {error}") from None
    return svid_from_pem(minted.chain_pem, minted.key_pem, minted.bundle_pem, settings.trust_domain)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupted_by_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, while a lab holds the stack
    changed: their default action would end the process without running the ``finally`` that
    puts the stack back."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Outcome:
    answer: str  # "HTTP 200", "refused in the handshake", "closed after the handshake"
    local_port: int  # finds the gateway's record of this connection in its audit


def present(
    address: tuple[str, int], chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, token: str
) -> Outcome:
    """GET /v1/accounts on a new TLS connection, presenting ``chain_pem`` whatever it holds
    (the labs present certificates the gateway must refuse)."""
    context = pem_client_context(chain_pem, key_pem, bundle_pem, ["http/1.1"])
    raw = socket.create_connection(address, timeout=PRESENT_TIMEOUT)
    local_port = int(raw.getsockname()[1])
    try:
        try:
            tls = context.wrap_socket(raw)
        except OSError:
            return Outcome("refused in the handshake", local_port)
        connection = http.client.HTTPConnection(*address, timeout=PRESENT_TIMEOUT)
        connection.sock = tls
        try:
            connection.request("GET", ACCOUNTS, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            return Outcome("closed after the handshake", local_port)
        return Outcome(f"HTTP {response.status}", local_port)
    finally:
        raw.close()
