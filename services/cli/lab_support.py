"""What the labs share: a teller SVID minted for them, and the gateway's audit read back
(native stack, ``ZTBANK_HOME``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from services._proto import issuer_admin_pb2 as pb
from services.cli.errors import CliError
from services.common.identity.source import SvidMaterial, svid_from_pem
from services.common.workloads import GATEWAY, TELLER
from services.issuer.admin_client import AdminCallError, call_admin
from services.stack.native import StackSettings

Say = Callable[[str], None]  # where a lab narrates, a line at a time

# The gateway may write the record of a refused handshake just after the client has seen the
# connection close.
AUDIT_WAIT_SECONDS = 3.0
POLL_SECONDS = 0.05


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
