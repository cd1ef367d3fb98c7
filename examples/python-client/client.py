"""A minimal ztbank client a team copies: its own SPIFFE identity, mutual TLS to the gateway,
the gateway's SPIFFE ID and revocation status checked, then one transfer for a customer.

Needs py-spiffe and cryptography (requirements.txt) and what ``ztbank env --workload NAME``
prints (``eval "$(ztbank env --workload NAME)"``):

    SPIFFE_ENDPOINT_SOCKET    the workload's Workload API socket: its SVID and trust bundle
    ZTBANK_TRUST_DOMAIN       the trust domain whose bundle is trusted
    ZTBANK_GATEWAY_URL        https://host:port of the gateway
    ZTBANK_GATEWAY_SPIFFE_ID  the only identity accepted for the gateway
    ZTBANK_CRL_URL            the issuer's CRLs; the gateway's certificate is checked against them

and ZTBANK_CUSTOMER_TOKEN, the customer's bearer token: customers log in through the bank's
channel app (in CI: ``ztbank login CUSTOMER``), and the token travels with each request.

    python client.py --from acc-alice-cny --to acc-bob-cny --amount 1.00

Exit 0 with the transfer as JSON on stdout; 1 with one line on stderr otherwise.  Nothing here
turns verification off: the chain is verified against the Workload API's bundle, the gateway's
SPIFFE ID is compared exactly, and a certificate whose revocation status cannot be established
from a fresh CRL signed by its CA is refused (fail closed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import ssl
import sys
import tempfile
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from spiffe import TrustDomain, WorkloadApiClient

TIMEOUT = 10.0
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class ClientError(Exception):
    """Anything that stops the client: one line for stderr."""


def setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ClientError(f'{name} is not set; run eval "$(ztbank env --workload NAME)" first')
    return value


def pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


class Identity:
    """This workload's X509-SVID and the trust domain's bundle, from the Workload API."""

    def __init__(self, socket: str, trust_domain: str) -> None:
        try:
            with WorkloadApiClient(socket_path=socket) as client:
                context = client.fetch_x509_context(timeout=TIMEOUT)
        except Exception as error:  # py-spiffe raises several unrelated types
            raise ClientError(f"no SVID from the Workload API at {socket}: {error}") from None
        svid = context.default_svid
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(trust_domain))
        if svid is None or bundle is None:
            raise ClientError("the Workload API sent no SVID or no bundle for the trust domain")
        self.spiffe_id = str(svid.spiffe_id)
        self.authorities = list(bundle.x509_authorities)
        self._chain = list(svid.cert_chain)
        self._key = svid.private_key

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # SPIFFE names services by the URI SAN, not a host name: the chain is still verified
        # against the bundle (CERT_REQUIRED), and the SPIFFE ID is checked after the handshake.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pem(self.authorities).decode())
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # ssl loads keys from files only: a private directory that is gone once they are loaded.
        with tempfile.TemporaryDirectory(prefix="svid-") as directory:
            chain_file, key_file = Path(directory, "chain.pem"), Path(directory, "key.pem")
            chain_file.write_bytes(pem(self._chain))
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(chain_file, key_file)
        return context


def spiffe_id_of(certificate: x509.Certificate) -> str:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 and uris[0].startswith("spiffe://") else ""


def check_revocation(leaf: x509.Certificate, authorities: list[x509.Certificate], url: str) -> None:
    """Refuse ``leaf`` unless a fresh CRL signed by the CA that issued it is fetched from
    ``url`` and does not list it.  The CRLs come over plain HTTP: their signature is the proof."""
    issuers = []
    for ca in authorities:
        try:
            leaf.verify_directly_issued_by(ca)
            issuers.append(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not issuers:
        raise ClientError("no CA of the bundle issued the gateway's certificate")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:  # noqa: S310 (http(s) only)
            body = reply.read()
    except OSError as error:
        raise ClientError(f"cannot fetch the CRLs from {url}: {error}") from None
    now = datetime.now(UTC)
    for block in _PEM_CRL.findall(body):
        crl = x509.load_pem_x509_crl(block)
        signer = next((c for c in issuers if crl.issuer == c.subject), None)
        if signer is None or not crl.is_signature_valid(signer.public_key()):  # type: ignore[arg-type]
            continue
        if crl.next_update_utc is None or crl.next_update_utc <= now:
            continue
        if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            raise ClientError(f"the gateway's certificate {leaf.serial_number:x} is revoked")
        return
    raise ClientError("no fresh CRL of the gateway's CA: its revocation status is unknown")


class GatewayConnection(http.client.HTTPSConnection):
    """HTTPS whose peer must be ``expected`` and not revoked, checked before any request."""

    def __init__(self, url: str, identity: Identity, expected: str, crl_url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ClientError(f"ZTBANK_GATEWAY_URL {url!r} must be https://host:port")
        super().__init__(
            parts.hostname, parts.port or 443, context=identity.tls_context(), timeout=TIMEOUT
        )
        self._identity = identity
        self._expected = expected
        self._crl_url = crl_url

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        leaf = x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True) or b"")
        found = spiffe_id_of(leaf)
        if found != self._expected:
            self.close()
            raise ClientError(f"expected the gateway {self._expected}, got {found or 'no ID'}")
        try:
            check_revocation(leaf, self._identity.authorities, self._crl_url)
        except ClientError:
            self.close()
            raise


def call(
    connection: http.client.HTTPSConnection,
    method: str,
    path: str,
    token: str,
    *,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, object]:
    all_headers = {"Accept": "application/json", "Authorization": f"Bearer {token}"}
    all_headers |= headers or {}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise ClientError(f"{method} {path}: {error}") from None
    return response.status, json.loads(raw) if raw else None


def refusal(status: int, body: object) -> ClientError:
    detail = body.get("detail") or body.get("title") if isinstance(body, dict) else body
    return ClientError(f"gateway answered {status}: {detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, metavar="ACCOUNT")
    parser.add_argument("--to", dest="target", required=True, metavar="ACCOUNT")
    parser.add_argument("--amount", required=True, help="decimal string, e.g. 1.00")
    parser.add_argument("--currency", default="CNY")
    args = parser.parse_args(argv)
    try:
        identity = Identity(setting("SPIFFE_ENDPOINT_SOCKET"), setting("ZTBANK_TRUST_DOMAIN"))
        token = setting("ZTBANK_CUSTOMER_TOKEN")
        connection = GatewayConnection(
            setting("ZTBANK_GATEWAY_URL"),
            identity,
            setting("ZTBANK_GATEWAY_SPIFFE_ID"),
            setting("ZTBANK_CRL_URL"),
        )
        try:
            status, accounts = call(connection, "GET", "/v1/accounts", token)
            if status != 200:
                raise refusal(status, accounts)
            owned = {a["id"] for a in accounts["accounts"]}  # type: ignore[index]
            if args.source not in owned:
                raise ClientError(f"{args.source} is not one of the customer's accounts")
            transfer = {
                "from_account": args.source,
                "to_account": args.target,
                "amount": args.amount,
                "currency": args.currency,
            }
            # The same key on a retry can never post twice.
            key = {"Idempotency-Key": str(uuid.uuid4())}
            status, posted = call(
                connection, "POST", "/v1/transfers", token, body=transfer, headers=key
            )
            if status not in (201, 202):
                raise refusal(status, posted)
        finally:
            connection.close()
    except ClientError as error:
        me = os.environ.get("ZTBANK_WORKLOAD_SPIFFE_ID", "client")
        print(f"{me}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(posted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
