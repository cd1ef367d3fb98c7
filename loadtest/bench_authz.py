"""``make bench-authz``: one authorization decision for a known peer, in process.

What every call to a ztbank service pays before its servicer runs, with the real components:
the peer's X509-SVID chain checked (``PeerVerifier``: remembered after the first time, the CRLs
asked every call), the policy matched (``Policy`` on ``infra/policy.json``), and the audit record
handed to the writer (``AuditLog.submit``; the sync that follows is shared by every request
waiting for it and is timed on its own line). A throwaway CA, SVID and CRL are made here; the
CRL is served on loopback to a real ``RevocationWatcher``.
"""

from __future__ import annotations

import argparse
import http.server
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from services.common.authz.audit import AuditLog, AuditRecord
from services.common.authz.policy import Policy
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, TRANSFER_ENGINE
from services.common.mtls.contexts import PeerVerifier
from services.common.revocation import RevocationWatcher
from services.common.stats import percentile
from services.issuer.domain.authority import Signer
from services.issuer.domain.certificates import (
    build_root_ca,
    build_signing_ca_csr,
    build_x509_svid,
    new_key,
    sign_signing_ca,
)
from services.issuer.domain.crl import build_crl

TRUST_DOMAIN = "ztbank.example"
REPO_ROOT = Path(__file__).resolve().parents[1]
METHOD = "/ztbank.ledger.v1.TransferEngine/GetAccount"
TARGET_P99_US = 50.0


@contextmanager
def crl_endpoint(pem: bytes) -> Iterator[str]:
    """``pem`` at http://127.0.0.1:<port>/crls until the block ends."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/pem-certificate-chain")
            self.send_header("Content-Length", str(len(pem)))
            self.end_headers()
            self.wfile.write(pem)

        def log_message(self, *args: object) -> None:
            del args

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/crls"
    finally:
        server.shutdown()
        server.server_close()


def percentiles(samples_ns: list[int]) -> str:
    return (
        f"p50 {percentile(samples_ns, 0.50) / 1000:7.1f} us"
        f"  p99 {percentile(samples_ns, 0.99) / 1000:7.1f} us  max {max(samples_ns) / 1000:8.1f} us"
    )


def timed(step: Callable[[], object], count: int) -> list[int]:
    samples = []
    for _ in range(count):
        started = time.perf_counter_ns()
        step()
        samples.append(time.perf_counter_ns() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="decisions to time")
    args = parser.parse_args()

    now = datetime.now(UTC)
    root_key, ca_key, peer_key = new_key(), new_key(), new_key()
    root = build_root_ca(root_key, TRUST_DOMAIN, now=now)
    csr = build_signing_ca_csr(ca_key, TRUST_DOMAIN, "ztbank bench signing CA")
    ca = sign_signing_ca(
        csr,
        issuer_cert=root,
        issuer_key=root_key,
        trust_domain=TRUST_DOMAIN,
        ttl=timedelta(hours=1),
        now=now,
    )
    caller = GATEWAY.spiffe_id(TRUST_DOMAIN)
    leaf = build_x509_svid(
        caller, peer_key.public_key(), ca_cert=ca, ca_key=ca_key, ttl=timedelta(minutes=5), now=now
    )
    crl = build_crl(
        Signer(ca, ca_key), [], number=1, this_update=now, next_update=now + timedelta(minutes=5)
    )
    material = SvidMaterial(
        spiffe_id=SpiffeId.parse(str(caller)), chain=(leaf, ca), key=peer_key, bundle=(root, ca)
    )
    chain = [c.public_bytes(serialization.Encoding.DER) for c in (leaf, ca)]
    policy = Policy(REPO_ROOT / "infra" / "policy.json", TRUST_DOMAIN)

    crl_pem = crl.public_bytes(serialization.Encoding.PEM)
    with crl_endpoint(crl_pem) as url, tempfile.TemporaryDirectory(prefix="ztauthz") as scratch:
        watcher = RevocationWatcher(url, lambda: material.bundle)
        watcher.start()
        watcher.wait_ready(10)
        verifier = PeerVerifier(lambda: material, TRUST_DOMAIN, revocation=watcher)
        audit = AuditLog(Path(scratch) / "audit.jsonl", fsync=True)

        def decide(wait_for_disk: bool) -> None:
            peer = verifier.verify(chain, "127.0.0.1:40000")
            decision = policy.decide(TRANSFER_ENGINE.name, METHOD, peer.spiffe_id)
            assert decision.allowed, decision.reason
            written = audit.submit(
                AuditRecord(
                    caller_spiffe_id=str(peer.spiffe_id),
                    cert_serial=peer.serial,
                    cert_sha256=peer.fingerprint_sha256,
                    source_addr="127.0.0.1",
                    source_port=40000,
                    dest_addr="127.0.0.1",
                    dest_port=50051,
                    tls_version="TLSv1.3",
                    cipher="TLS_AES_256_GCM_SHA384",
                    service=TRANSFER_ENGINE.name,
                    method=METHOD,
                    decision="allow",
                    reason=decision.reason,
                    trace_id=None,
                )
            )
            if wait_for_disk:
                written.result()

        first = timed(lambda: decide(False), 1)
        timed(lambda: decide(False), 1000)  # warm-up
        handed_off = timed(lambda: decide(False), args.count)
        on_disk = timed(lambda: decide(True), min(args.count, 2000))
        audit.close()
        watcher.close()

    p99_us = percentile(handed_off, 0.99) / 1000
    print(f"one authorization decision for a known peer (n={args.count}), in process")
    print(f"  first sight of the chain (full X509-SVID verification): {first[0] / 1000:.0f} us")
    print(f"  verify + revocation + policy + audit hand-off:  {percentiles(handed_off)}")
    print(f"  ... and waiting for the record's fsync (alone): {percentiles(on_disk)}")
    verdict = "meets" if p99_us <= TARGET_P99_US else "misses"
    print(f"  target p99 <= {TARGET_P99_US:.0f} us: {verdict} ({p99_us:.1f} us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
