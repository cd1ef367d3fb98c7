"""``make bench`` (issuer): SVIDs issued per second and Workload API fetch latency p50/p99.

Everything runs side by side in one invocation on this machine, against a real issuer process
on a temporary socket; nothing is compared across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from grpclib.client import Channel
from spiffe import WorkloadApiClient

from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.common.identity.spiffe_id import SpiffeId
from services.common.stats import percentile
from services.issuer.adapters.upstream.disk import DiskUpstream, init_root_ca
from services.issuer.admin_client import call_admin
from services.issuer.domain.authority import AuthorityState, CertificateAuthority
from services.issuer.harness import IssuerProcess

TRUST_DOMAIN = "ztbank.example"
WORKLOAD_ID = "spiffe://ztbank.example/env/prod/zone/az1/team/payments/svc/bench"


class _MemoryStore:
    def __init__(self) -> None:
        self.state = AuthorityState()

    def load(self) -> AuthorityState:
        return self.state

    def save(self, state: AuthorityState) -> None:
        self.state = state


def _latencies(call: Callable[[], object], count: int) -> list[float]:
    call()  # warm the channel and the issuer's cache
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def bench_signing(certs_dir: Path, count: int) -> float:
    """In-process: new P-256 key + X509-SVID signature, the issuer's core cost."""
    authority = CertificateAuthority(
        trust_domain=TRUST_DOMAIN,
        upstream=DiskUpstream(certs_dir),
        store=_MemoryStore(),
        ca_ttl=timedelta(hours=1),
    )
    authority.maintain()
    spiffe_id = SpiffeId.parse(WORKLOAD_ID)
    start = time.perf_counter()
    for _ in range(count):
        authority.sign_x509_svid(spiffe_id, ttl=timedelta(minutes=5))
    return count / (time.perf_counter() - start)


async def _mint_many(admin_socket: Path, count: int) -> float:
    channel = Channel(path=str(admin_socket))
    stub = IssuerAdminStub(channel)
    request = pb.MintX509SVIDRequest(spiffe_id=WORKLOAD_ID, ttl_seconds=300)
    try:
        await stub.MintX509SVID(request)
        start = time.perf_counter()
        for _ in range(count):
            await stub.MintX509SVID(request)
        return count / (time.perf_counter() - start)
    finally:
        channel.close()


async def _create_entry(stub: IssuerAdminStub) -> pb.Entry:
    request = pb.CreateEntryRequest(spiffe_id=WORKLOAD_ID, selectors=[f"unix:uid:{os.getuid()}"])
    return await stub.CreateEntry(request)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500, help="Workload API calls per row")
    parser.add_argument("--signings", type=int, default=2000, help="in-process signatures")
    parser.add_argument("--mints", type=int, default=300, help="admin API mints")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ztbench", dir="/tmp"))
    try:
        certs = workdir / "certs"
        init_root_ca(certs, TRUST_DOMAIN)
        env = {"ZTBANK_HOME": str(workdir / "var"), "ZTBANK_CERTS_DIR": str(certs)}
        rows: list[tuple[str, str]] = []
        rows.append(
            (
                "X509-SVIDs signed per second, in process (1 core)",
                f"{bench_signing(certs, args.signings):,.0f}",
            )
        )
        with IssuerProcess(env, workdir / "issuer.log") as issuer:
            call_admin(issuer.admin_socket, _create_entry)
            mint_rate = asyncio.run(_mint_many(issuer.admin_socket, args.mints))
            rows.append(
                (
                    "X509-SVIDs minted per second, admin API (gRPC + SQLite record)",
                    f"{mint_rate:,.0f}",
                )
            )
            client = WorkloadApiClient(socket_path=issuer.socket_uri)
            try:
                calls: list[tuple[str, Callable[[], object]]] = [
                    ("FetchX509SVID (first message of the stream)", client.fetch_x509_svid),
                    ("FetchX509Bundles", client.fetch_x509_bundles),
                    ("FetchJWTSVID", lambda: client.fetch_jwt_svid(audience={"bench"})),
                ]
                for name, call in calls:
                    samples = _latencies(call, args.requests)
                    rows.append(
                        (
                            f"{name} latency p50 / p99 ms (n={args.requests})",
                            f"{percentile(samples, 0.50):.2f} / {percentile(samples, 0.99):.2f}",
                        )
                    )
            finally:
                client.close()
        width = max(len(name) for name, _ in rows)
        print(f"{'issuer benchmark'.ljust(width)}  result")
        print(f"{'-' * width}  ------")
        for name, value in rows:
            print(f"{name.ljust(width)}  {value}")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
