"""``make bench`` (bank): end-to-end transfer latency at fixed rates and maximum throughput.

A private native stack is started on free ports; clients act as the teller over mTLS, exactly as
the CLI does.  Each transfer crosses gateway -> transfer-engine -> risk and is posted in SQLite.
Latency is measured from the moment a request was *scheduled* (open loop), so a slow server is
not hidden by a client that waits for it.  Clients and services share this machine's 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.cli.teller import TellerClient
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.workloads import TELLER
from services.issuer.admin_client import call_admin
from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_stack

ACCOUNTS = ("acc-alice-cny", "acc-alice-savings")
# Why requests failed, printed under the table.
ERRORS: Counter[str] = Counter()
# Velocity review would turn most benchmark transfers into held ones: relax it for the run.
BENCH_RULES = {"velocity_max_transfers": 1000, "velocity_window_seconds": 1}


@dataclass
class Result:
    name: str
    latencies_ms: list[float]
    failures: int
    seconds: float

    def row(self) -> tuple[str, str, str, str, str]:
        ordered = sorted(self.latencies_ms) or [float("nan")]
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        rate = len(self.latencies_ms) / self.seconds
        return (
            self.name,
            f"{rate:,.1f}",
            f"{statistics.median(ordered):.1f}",
            f"{p99:.1f}",
            str(self.failures),
        )


class Worker:
    """One teller client with its own keep-alive connection and customer token."""

    def __init__(self, client: TellerClient, *, reuse: bool) -> None:
        self._client = client
        self._reuse = reuse
        self._connection = client.connect() if reuse else None
        self._token = client.token("alice")
        self._turn = itertools.count()

    def transfer(self) -> bool:
        source, target = ACCOUNTS if next(self._turn) % 2 == 0 else reversed(ACCOUNTS)
        reply = self._client.request(
            "POST",
            "/v1/transfers",
            body={
                "from_account": source,
                "to_account": target,
                "amount": "0.01",
                "currency": "CNY",
            },
            headers={
                "Authorization": f"Bearer {self._token}",
                "Idempotency-Key": str(uuid.uuid4()),
            },
            connection=self._connection,
        )
        if reply.status != 201:
            ERRORS[f"HTTP {reply.status}: {reply.body}"] += 1
        return reply.status == 201


def _safe(call: Callable[[], bool]) -> bool:
    try:
        return call()
    except Exception as error:  # a failed request is counted, never fatal to the benchmark
        ERRORS[f"{type(error).__name__}: {error}"] += 1
        return False


def fixed_rate(workers: list[Worker], rate: float, seconds: float) -> Result:
    """Open loop: requests are scheduled every 1/rate s; latency counts from the schedule."""
    schedule: queue.Queue[float | None] = queue.Queue()
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def run(worker: Worker) -> None:
        while (due := schedule.get()) is not None:
            time.sleep(max(0.0, due - time.perf_counter()))
            ok = _safe(worker.transfer)
            elapsed = (time.perf_counter() - due) * 1000
            with lock:
                latencies.append(elapsed) if ok else failures.__setitem__(0, failures[0] + 1)

    start = time.perf_counter() + 0.2
    total = int(rate * seconds)
    for i in range(total):
        schedule.put(start + i / rate)
    for _ in workers:
        schedule.put(None)
    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Result(f"{rate:g} transfers/s offered", latencies, failures[0], seconds)


def max_throughput(workers: list[Worker], seconds: float, name: str) -> Result:
    """Closed loop: every worker sends as fast as answers come back."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def run(worker: Worker) -> None:
        while time.perf_counter() < stop:
            began = time.perf_counter()
            ok = _safe(worker.transfer)
            elapsed = (time.perf_counter() - began) * 1000
            with lock:
                latencies.append(elapsed) if ok else failures.__setitem__(0, failures[0] + 1)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Result(name, latencies, failures[0], seconds)


def minted_teller(stack: NativeStack, ttl_seconds: int) -> SvidMaterial:
    """A teller SVID from the admin API: it outlives short workload TTLs and can be revoked
    without touching the real teller."""
    spiffe_id = TELLER.spiffe_id(stack.settings.trust_domain)
    request = pb.MintX509SVIDRequest(spiffe_id=str(spiffe_id), ttl_seconds=ttl_seconds)
    reply = call_admin(stack.settings.admin_socket, lambda stub: stub.MintX509SVID(request))
    key = serialization.load_pem_private_key(reply.key_pem, password=None)
    return SvidMaterial(
        spiffe_id=SpiffeId.parse(str(spiffe_id)),
        chain=tuple(x509.load_pem_x509_certificates(reply.chain_pem)),
        key=key,
        bundle=tuple(x509.load_pem_x509_certificates(reply.bundle_pem)),
    )


def _refused(client: TellerClient, connection: Any) -> bool:
    try:
        return client.request("GET", "/healthz", connection=connection).status != 200
    except Exception:  # any failure to be served counts as refused here
        return True


async def _revoke(stub: IssuerAdminStub, *, serial: str) -> pb.RevokeResponse:
    return await stub.Revoke(pb.RevokeRequest(serial=serial, reason="keyCompromise"))


def revocation_propagation(stack: NativeStack, count: int) -> tuple[list[float], list[float]]:
    """Seconds from `Revoke` returning until (a) a new connection and (b) an open keep-alive
    connection of the revoked client are refused, over ``count`` revocations."""
    new_connection, open_connection = [], []
    for _ in range(count):
        victim = minted_teller(stack, 120)
        client = TellerClient(stack.settings, victim)
        kept = client.connect()
        assert client.request("GET", "/healthz", connection=kept).status == 200
        call_admin(stack.settings.admin_socket, partial(_revoke, serial=victim.serial))
        revoked = time.perf_counter()
        seen: dict[str, float] = {}
        while len(seen) < 2 and time.perf_counter() - revoked < 10:
            if "new" not in seen and _refused(client, None):
                seen["new"] = time.perf_counter() - revoked
            if "open" not in seen and _refused(client, kept):
                seen["open"] = time.perf_counter() - revoked
            time.sleep(0.005)
        kept.close()
        new_connection.append(seen.get("new", float("inf")))
        open_connection.append(seen.get("open", float("inf")))
    return new_connection, open_connection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rates", default="10,25,50", help="offered transfers per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each row")
    parser.add_argument("--clients", type=int, default=8, help="concurrent teller connections")
    parser.add_argument(
        "--rotation-rate", type=float, default=25.0, help="offered rate of the rotation rows"
    )
    parser.add_argument("--revocations", type=int, default=10, help="revocations to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ztbench") as scratch:
        rules = Path(scratch) / "rules.json"
        rules.write_text(json.dumps(BENCH_RULES))
        with sandbox_stack(risk_rules=rules) as stack:
            client = TellerClient(stack.settings)
            keep_alive = [Worker(client, reuse=True) for _ in range(args.clients)]
            results = [
                fixed_rate(keep_alive, float(rate), args.seconds) for rate in args.rates.split(",")
            ]
            results.append(
                max_throughput(keep_alive, args.seconds, f"max, {args.clients} keep-alive clients")
            )
            fresh = [Worker(client, reuse=False) for _ in range(args.clients)]
            results.append(
                max_throughput(
                    fresh, args.seconds, f"max, {args.clients} clients, new TLS connection each"
                )
            )
            calm = fixed_rate(fresh, args.rotation_rate, args.seconds)
            calm.name = f"{args.rotation_rate:g}/s, new connections, SVID TTL 5m (no rotation)"
            results.append(calm)
            new_connection, open_connection = revocation_propagation(stack, args.revocations)
        with sandbox_stack(svid_ttl="10s", risk_rules=rules) as stack:
            # A minted teller SVID outlives the 10 s TTL, so only the services rotate.
            client = TellerClient(stack.settings, minted_teller(stack, 600))
            fresh = [Worker(client, reuse=False) for _ in range(args.clients)]
            rotating = fixed_rate(fresh, args.rotation_rate, args.seconds)
            rotating.name = (
                f"{args.rotation_rate:g}/s, new connections, SVID TTL 10s (rotating every 4-5 s)"
            )
            results.append(rotating)
    header = (
        "transfers (POST /v1/transfers, 3 services, mTLS)",
        "done/s",
        "p50 ms",
        "p99 ms",
        "failed",
    )
    rows = [header, *(r.row() for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for reason, count in ERRORS.most_common(5):
        print(f"  failed {count}x: {reason}")
    print()
    print(f"revocation propagation over {args.revocations} revocations (seconds after Revoke)")
    for name, samples in (
        ("new connection refused", new_connection),
        ("open connection cut", open_connection),
    ):
        print(f"  {name:<24} median {statistics.median(samples):.3f}  worst {max(samples):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
