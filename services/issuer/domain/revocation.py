"""Revocation records and their vocabulary: RFC 5280 reason names and certificate serials.

Two things can be revoked:

* a certificate, by serial: it appears on its CA's CRL and OCSP answers ``revoked`` until it
  expires.  A revoked certificate stays revoked (RFC 5280 has no way back except
  ``certificateHold``, which the issuer does not offer);
* a SPIFFE ID: every unexpired certificate issued for it is revoked as above, and no new SVID is
  issued for it (Workload API or mint) until the ID's revocation is lifted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from services.issuer.errors import RevocationError

# The reasons an operator may give, by their RFC 5280 names.  Left out: cACompromise and
# aACompromise (a compromised CA is rotated, not listed), certificateHold (a hold is reversible;
# these revocations are not) and removeFromCRL (delta CRLs only).
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}
DEFAULT_REASON = "unspecified"
# A serial is at most 20 octets (RFC 5280 4.1.2.2).
_MAX_SERIAL_BITS = 160
_HEX = re.compile(r"[0-9a-f]{1,64}")


def parse_reason(text: str) -> str:
    """The canonical RFC 5280 name for ``text`` (case-insensitive); empty means unspecified."""
    if not text:
        return DEFAULT_REASON
    for name in REASONS:
        if name.lower() == text.strip().lower():
            return name
    raise RevocationError(f"unknown revocation reason {text!r} (one of: {', '.join(REASONS)})")


def reason_flag(name: str) -> x509.ReasonFlags | None:
    """The reason to put in a CRL entry or OCSP answer; RFC 5280 5.3.1 says to omit
    ``unspecified`` rather than state it."""
    flag = REASONS[name]
    return None if flag is x509.ReasonFlags.unspecified else flag


def parse_serial(text: str) -> str:
    """Lowercase hex without leading zeros (as the issuer prints serials) from hex as people
    paste it: any case, an optional ``0x``, colons (``openssl x509 -serial`` and ``-text``)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    value = int(cleaned, 16) if _HEX.fullmatch(cleaned) else 0
    if value <= 0 or value.bit_length() > _MAX_SERIAL_BITS:
        raise RevocationError(f"{text!r} is not a certificate serial (hex, e.g. 4f0c...)")
    return format(value, "x")


@dataclass(frozen=True)
class RevokedCertificate:
    serial: str  # lowercase hex, as in the ``issued`` register
    spiffe_id: str
    reason: str  # a key of REASONS
    revoked_at: datetime
    not_after: datetime
    # The signing CA that issued it; None for certificates issued before the issuer recorded it.
    ca_serial: str | None


@dataclass(frozen=True)
class RevokedId:
    spiffe_id: str
    reason: str
    revoked_at: datetime


@dataclass(frozen=True)
class RevocationResult:
    """What one revoke (or undo) changed, for the admin API to report."""

    serials: tuple[str, ...]
    spiffe_id: str
    reason: str
    at: datetime
    # Serials that were some entry's current SVID: those workloads get a fresh SVID at once.
    replaced: tuple[str, ...] = ()


# Where the issuer publishes revocation status, relative to its base URL (ZTBANK_ISSUER_HTTP).
CRLS_PATH = "/crls"
OCSP_PATH = "/ocsp"


def crl_url(base_url: str, ca_serial: str) -> str:
    """The DER CRL of the signing CA with serial ``ca_serial`` (lowercase hex)."""
    return f"{base_url}/crl/{ca_serial}.crl"


def crls_url(base_url: str) -> str:
    """Every current CRL as concatenated PEM: what a watcher polls."""
    return base_url + CRLS_PATH


def ocsp_url(base_url: str) -> str:
    return base_url + OCSP_PATH
