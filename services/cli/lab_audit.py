"""What the labs read back from the gateway's audit file (native stack, ``ZTBANK_HOME``)."""

from __future__ import annotations

import json
import time

from services.common.workloads import GATEWAY
from services.stack.native import StackSettings

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
