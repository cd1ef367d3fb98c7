"""What the page shows of the stack, gathered as ``ztbank status`` gathers it (mTLS probes as the
ops identity, the issuer's admin socket) plus the issuer's CRLs, read with the console's own
SVID.  Blocking: the console calls it from a worker thread."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from cryptography import x509

from services.common.errors import CommonError
from services.common.identity.pem import serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.workloads import CONSOLE
from services.common.revocation import crl_reason, crl_signed_by, split_pem_crls
from services.console.settings import ConsoleSettings
from services.stack.native import NativeStack, stack_hint, status_document, workload_svid

CRL_TIMEOUT_SECONDS = 2.0
START_COMMAND = "make up"


def revoked_certificates(crl_url: str, bundle: Sequence[x509.Certificate]) -> list[dict[str, Any]]:
    """The entries of the issuer's CRLs whose signature a CA of ``bundle`` verifies (a CRL we
    cannot verify is not shown: the page would repeat what nobody vouches for)."""
    with urllib.request.urlopen(crl_url, timeout=CRL_TIMEOUT_SECONDS) as reply:  # noqa: S310
        body = reply.read()
    entries: list[dict[str, Any]] = []
    for pem in split_pem_crls(body):
        crl = x509.load_pem_x509_crl(pem)
        signer = next((ca for ca in bundle if crl_signed_by(crl, ca)), None)
        if signer is None:
            continue
        entries.extend(
            {
                "serial": format(entry.serial_number, "x"),
                "revoked_at": entry.revocation_date_utc.isoformat(),
                "reason": crl_reason(entry),
                "ca": serial_hex(signer),
            }
            for entry in crl
        )
    return sorted(entries, key=lambda e: e["revoked_at"], reverse=True)


class StackView:
    """The stack as the console sees it: ``snapshot()`` is what the page is sent."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings
        self.stack = NativeStack(settings)
        self._identity: SvidMaterial | None = None

    def identity(self) -> SvidMaterial | None:
        """The console's own X509-SVID (its own entry and socket), renewed at half-life; None
        while the issuer does not answer."""
        held = self._identity
        if held is None or held.seconds_left() < held.lifetime.total_seconds() / 2:
            try:
                self._identity = workload_svid(self.settings, CONSOLE.name, timeout=2)
            except CommonError:
                self._identity = held if held is not None and held.seconds_left() > 0 else None
        return self._identity

    def snapshot(self) -> dict[str, Any]:
        status = self.stack.status()
        identity = self.identity()
        up = status.issuer_running and identity is not None
        revoked: list[dict[str, Any]] = []
        crl_error = None
        if identity is not None:
            try:
                revoked = revoked_certificates(status.issuer_crl_url, identity.bundle)
            except (OSError, ValueError) as error:
                crl_error = f"the CRLs at {status.issuer_crl_url} could not be read: {error}"
        return {
            "taken": time.time(),
            "up": up,
            "start_hint": None if up else stack_hint(self.settings.home),
            "start_command": START_COMMAND,
            "console": {
                "spiffe_id": str(CONSOLE.spiffe_id(self.settings.trust_domain)),
                "svid_serial": identity.serial if identity else None,
            },
            "stack": status_document(status),
            "revoked": revoked,
            "crl_error": crl_error,
        }
