"""``ztbank lab revocation``: revoke a client that is connected, and watch it being cut off.

Against the running native stack (``make up``), step by step, each with what was observed:

1. mint a teller SVID (the victim) through the issuer's admin API;
2. the victim's keep-alive connection is served;
3. revoke the victim's serial, as ``ztbank revoke --serial`` does;
4. measure how long the open connection and a new handshake keep working;
5. the issuer's CRLs (verified against the bundle) list the serial, and OCSP says revoked;
6. the stack's own teller (the bystander) is still served;
7. the gateway audited the refusal.

The lab passes when every step shows what zero trust promises and both cut-offs came within
the budget.  It is what a trainer runs in front of the class, and what the e2e suite runs.
"""

from __future__ import annotations

import http.client
import time
import urllib.request
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from services._proto import issuer_admin_pb2 as pb
from services.common.identity.source import SvidMaterial
from services.common.revocation import RevocationWatcher
from services.issuer.admin_client import call_admin
from services.issuer.domain.revocation import crls_url, ocsp_url
from services.labs.errors import LabUsageError
from services.labs.support import (
    ACCOUNTS,
    Say,
    accounts_served,
    last_gateway_denial,
    mint_teller_svid,
)
from services.labs.teller import TellerClient
from services.stack.native import StackSettings

VICTIM_TTL_SECONDS = 300
DEFAULT_BUDGET_SECONDS = 5.0
POLL_SECONDS = 0.05
HTTP_TIMEOUT = 5.0
CUSTOMER = "alice"


@dataclass(frozen=True)
class CutOff:
    """Seconds after the revocation returned at which each path stopped working (None:
    still working when the budget ran out)."""

    open_connection: float | None
    new_connection: float | None


def _watch_cut_off(
    victim: TellerClient,
    token: str,
    connection: http.client.HTTPSConnection,
    revoked_at: float,
    budget: float,
) -> CutOff:
    open_cut: float | None = None
    new_cut: float | None = None
    while (open_cut is None or new_cut is None) and time.monotonic() < revoked_at + budget:
        if open_cut is None and not accounts_served(victim, token, connection):
            open_cut = time.monotonic() - revoked_at
        if new_cut is None and not accounts_served(victim, token):
            new_cut = time.monotonic() - revoked_at
        time.sleep(POLL_SECONDS)
    return CutOff(open_cut, new_cut)


def ocsp_status(url: str, leaf: x509.Certificate, issuer: x509.Certificate) -> str:
    """The issuer's OCSP answer for ``leaf`` (GOOD, REVOKED or UNKNOWN), its signature checked
    against the CA that issued ``leaf`` (InvalidSignature otherwise)."""
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
    http_request = urllib.request.Request(  # noqa: S310 (the issuer's http:// URL)
        url,
        data=request.public_bytes(serialization.Encoding.DER),
        headers={"Content-Type": "application/ocsp-request"},
    )
    with urllib.request.urlopen(http_request, timeout=HTTP_TIMEOUT) as reply:  # noqa: S310
        response = ocsp.load_der_ocsp_response(reply.read())
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return f"an error ({response.response_status.name})"
    public_key = issuer.public_key()
    algorithm = response.signature_hash_algorithm
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or algorithm is None:
        return "an unverifiable answer"
    public_key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
    return response.certificate_status.name


def _revoke(settings: StackSettings, serial: str) -> pb.RevokeResponse:
    request = pb.RevokeRequest(serial=serial, reason="keyCompromise")
    return call_admin(settings.admin_socket, lambda stub: stub.Revoke(request))


def _listed_in_crls(settings: StackSettings, victim: SvidMaterial) -> bool:
    watcher = RevocationWatcher(crls_url(settings.issuer_url), lambda: victim.bundle)
    watcher.poll()
    return victim.serial in watcher.revoked_serials()


def check_budget(budget: float) -> None:
    """Refuse, before anything runs, a budget no cut-off can meet."""
    if budget <= 0:
        raise LabUsageError(f"--budget must be a positive number of seconds (got {budget:g})")


def run_revocation_lab(settings: StackSettings, say: Say, *, budget: float) -> bool:
    """Run the lab, narrating through ``say``; True when everything behaved."""
    say("lab revocation: a connected teller client is revoked")
    bystander = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    token = bystander.token(CUSTOMER)
    victim_svid = mint_teller_svid(settings, VICTIM_TTL_SECONDS)
    short = f"{victim_svid.serial[:12]}…"
    say(f"  1 minted a teller SVID for the victim: serial {short}, valid {VICTIM_TTL_SECONDS} s")

    victim = TellerClient(settings, victim_svid)
    connection = victim.connect()
    try:
        if not accounts_served(victim, token, connection):
            say("  2 the victim is not served even before the revocation")
            say("lab failed: see the steps above")
            return False
        say(f"  2 the victim's keep-alive connection is served: GET {ACCOUNTS} -> 200")
        started = time.monotonic()
        revoked = _revoke(settings, victim_svid.serial)
        revoked_at = time.monotonic()
        say(
            f"  3 revoked serial {short} (keyCompromise) in {revoked_at - started:.2f} s;"
            f" CRL number now {revoked.crl_number}"
        )
        cut = _watch_cut_off(victim, token, connection, revoked_at, budget)
    finally:
        connection.close()

    checks: list[bool] = []
    for label, seconds in (
        ("the open connection was cut", cut.open_connection),
        ("a new handshake was refused", cut.new_connection),
    ):
        checks.append(seconds is not None)
        when = f"after {seconds:.2f} s" if seconds is not None else f"NOT within {budget:g} s"
        say(f"  4 {label} {when}")

    listed = _listed_in_crls(settings, victim_svid)
    status = ocsp_status(ocsp_url(settings.issuer_url), victim_svid.leaf, victim_svid.chain[1])
    checks += [listed, status == "REVOKED"]
    verb = "list" if listed else "do NOT list"
    say(f"  5 the CRLs at {crls_url(settings.issuer_url)} {verb} it; OCSP answers {status}")

    bystander_served = accounts_served(bystander, token)
    checks.append(bystander_served)
    say(f"  6 the stack's own teller {'is' if bystander_served else 'is NOT'} still served")

    reason = last_gateway_denial(settings, cert_serial=victim_svid.serial)
    checks.append(reason is not None and "revoked" in reason)
    say(f"  7 the gateway audited {f'a deny: {reason!r}' if reason else 'NO deny for it'}")

    if not all(checks):
        say("lab failed: see the steps above")
        return False
    worst = max(s for s in (cut.open_connection, cut.new_connection) if s is not None)
    say(f"lab passed: the revoked client was cut off within {worst:.2f} s (budget {budget:g} s)")
    return True
