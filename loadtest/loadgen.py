"""A small, efficient HTTPS load generator for ``make bench-bank``: asyncio, raw HTTP/1.1 over
keep-alive TLS connections with a client certificate, and only as much HTTP as the two gateways
need (a status line and Content-Length; both answer with Content-Length).

Two modes:

* **open** loop: request *i* is due at ``start + i/rate``; a free connection takes it, or it
  waits in a queue until one is free.  Latency counts from the due time, so queueing (in the
  server or here, for a connection) shows instead of being hidden by a client that slows down.
* **closed** loop: every connection sends its next request as soon as the last answer arrived;
  latency counts from the send.  Its rate is the maximum the server sustains with that many
  connections.

Run in its own process, so that its CPU is not charged to the servers and can be measured:
``python -m loadtest.loadgen --help``.  ``run_in_process`` does that for the benchmark and calls
back when the connections are open (before the first request) and right after the last answer,
so the caller can read the servers' CPU counters around exactly the loaded window.  The result is
one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.stats import percentile

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN_ENV = "LOADGEN_TOKEN"  # noqa: S105 - the name of a variable, not a secret
REASON_LIMIT = 160
READY, DONE, GO = "ready", "done", "go"


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.1 this parser handles."""


class LoadgenError(RuntimeError):
    """The load generator process failed (the message has its stderr)."""


@dataclass(frozen=True)
class Target:
    """Where to send, and the TLS material: our client certificate and the CA to verify with."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path
    # Off only for servers whose certificate names no host (SPIFFE SVIDs carry a URI SAN): the
    # chain is still verified against ``ca``.
    check_hostname: bool = True


@dataclass(frozen=True)
class Workload:
    kind: str  # "read": GET /v1/accounts/{id}; "transfer": POST /v1/transfers
    token: str = ""  # customer bearer token (ztbank needs one; the bare gateway ignores it)
    accounts: tuple[str, str] = ("acc-alice-cny", "acc-alice-savings")
    amount: str = "0.01"
    currency: str = "CNY"


@dataclass(frozen=True)
class Load:
    mode: str  # "open" or "closed"
    seconds: float
    connections: int
    rate: float = 0.0  # requests per second (open loop only)
    timeout: float = 10.0  # per request
    drain: float = 10.0  # open loop: answers are awaited drain + timeout after the last is due


@dataclass
class LoadResult:
    mode: str
    rate: float  # offered (open loop), 0 for closed loop
    seconds: float
    connections: int
    scheduled: int  # requests due (open) or sent (closed)
    completed: int  # answered 2xx
    elapsed: float  # seconds from the start to the last 2xx answer (at least ``seconds``, open)
    latencies_ms: list[float]  # of the 2xx answers
    errors: dict[str, int]  # reason -> count
    statuses: dict[str, int]  # HTTP status -> count
    cpu_seconds: float  # the load generator's own CPU (user + system) during the run

    @property
    def achieved(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_ms(self, fraction: float) -> float:
        """The 2xx answers' latency at ``fraction`` (0.99 is p99; nearest rank, as every report
        of ztbank's); NaN when nothing was answered: such a run does not hold its rate and its
        ratios are not numbers, where an error would end the whole benchmark."""
        return percentile(self.latencies_ms, fraction) if self.latencies_ms else math.nan

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> LoadResult:
        return cls(**document)


# -- pure parts ------------------------------------------------------------------------------


def scheduled_count(rate: float, seconds: float) -> int:
    """How many requests an open loop at ``rate`` sends in ``seconds``."""
    return max(1, round(rate * seconds))


def due_count(elapsed: float, rate: float, total: int) -> int:
    """How many of the ``total`` requests (request i is due at i/rate) are due ``elapsed``
    seconds after the start."""
    if elapsed < 0:
        return 0
    return min(total, math.floor(elapsed * rate + 1e-9) + 1)


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and keep-alive of a response head (up to the blank line)."""
    if not head.startswith(b"HTTP/1.") or len(head) < 12:
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError(f"bad status line: {head[:40]!r}") from None
    lower = head.lower()
    start = lower.find(b"\r\ncontent-length:")
    if start < 0:
        if b"\r\ntransfer-encoding:" in lower:
            raise ProtocolError("chunked responses are not supported")
        length = 0
    else:
        start += len(b"\r\ncontent-length:")
        length = int(lower[start : lower.index(b"\r\n", start)])
    keep_alive = b"\r\nconnection: close" not in lower
    return status, length, keep_alive


def http_reason(status: int, body: bytes) -> str:
    """An error group for a non-2xx answer: the status and the start of the body."""
    excerpt = body[:REASON_LIMIT].decode(errors="replace")
    return f"HTTP {status}: {excerpt}" if excerpt else f"HTTP {status}"


def exception_reason(error: BaseException) -> str:
    """An error group for an exception: its type and message (messages vary less than you'd
    fear: addresses and ports are what they carry)."""
    text = str(error)[:REASON_LIMIT]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Requests:
    """The request bytes, built with as little work per request as possible."""

    def __init__(self, workload: Workload, host: str) -> None:
        common = f"Host: {host}\r\nAccept: application/json\r\n"
        if workload.token:
            common += f"Authorization: Bearer {workload.token}\r\n"
        self._kind = workload.kind
        self._reads = [
            f"GET /v1/accounts/{account} HTTP/1.1\r\n{common}\r\n".encode()
            for account in workload.accounts
        ]
        self._transfer_head = (
            f"POST /v1/transfers HTTP/1.1\r\n{common}Content-Type: application/json\r\n"
            "Idempotency-Key: "
        ).encode()
        source, target = workload.accounts
        self._transfer_tails = []
        for from_account, to_account in ((source, target), (target, source)):
            body = json.dumps(
                {
                    "from_account": from_account,
                    "to_account": to_account,
                    "amount": workload.amount,
                    "currency": workload.currency,
                },
                separators=(",", ":"),
            )
            self._transfer_tails.append(f"\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        self.health = f"GET /healthz HTTP/1.1\r\n{common}\r\n".encode()
        # Unique across runs and processes: a random prefix and a counter.
        self._key_prefix = uuid.uuid4().hex[:16].encode()
        self._count = 0

    def next(self) -> bytes:
        """The next request; transfers alternate direction, so balances never run out."""
        count = self._count
        self._count = count + 1
        if self._kind == "read":
            return self._reads[count & 1]
        key = self._key_prefix + b"-" + str(count).encode()
        return self._transfer_head + key + self._transfer_tails[count & 1]


# -- connections -----------------------------------------------------------------------------


def client_context(target: Target) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(target.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = target.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED  # always: the chain is verified against the CA
    context.load_cert_chain(target.cert, target.key)
    context.set_alpn_protocols(["http/1.1"])
    return context


class Connection:
    """One keep-alive connection; reopened when the server closed it."""

    def __init__(self, target: Target, context: ssl.SSLContext) -> None:
        self._target = target
        self._context = context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self._reader, self._writer = await asyncio.open_connection(
            self._target.host, self._target.port, ssl=self._context
        )
        return self._reader, self._writer

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        reader, writer = self._reader, self._writer
        if reader is None or writer is None or reader.at_eof():
            self.close()  # the server closed an idle connection: not an error
            reader, writer = await self.open()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status, length, keep_alive = parse_head(head)
        body = await reader.readexactly(length) if length else b""
        if not keep_alive:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


# -- the run ---------------------------------------------------------------------------------


@dataclass
class _Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    finished: int = 0  # answered or failed
    last_success: float = 0.0


class Runner:
    def __init__(self, target: Target, workload: Workload, load: Load) -> None:
        self._target = target
        self._load = load
        self._requests = Requests(workload, f"{target.host}:{target.port}")
        context = client_context(target)
        self._connections = [Connection(target, context) for _ in range(load.connections)]
        self._tally = _Tally()

    async def prepare(self) -> None:
        """Open every connection and send it one health check (a failure here is fatal)."""
        await asyncio.gather(*(c.open() for c in self._connections))
        answers = await asyncio.gather(
            *(c.exchange(self._requests.health) for c in self._connections)
        )
        for status, body in answers:
            if status != 200:
                raise LoadgenError(f"health check failed: {http_reason(status, body)}")

    async def _one(self, connection: Connection, since: float) -> None:
        request = self._requests.next()
        tally = self._tally
        try:
            async with asyncio.timeout(self._load.timeout):
                status, body = await connection.exchange(request)
        except TimeoutError:
            connection.close()
            tally.errors[f"no answer within {self._load.timeout:g}s (timeout)"] += 1
            tally.finished += 1
            return
        except Exception as error:  # every failure is counted by reason, none ends the run
            connection.close()
            tally.errors[exception_reason(error)] += 1
            tally.finished += 1
            return
        now = time.perf_counter()
        tally.finished += 1
        tally.statuses[str(status)] += 1
        if 200 <= status < 300:
            tally.latencies_ms.append((now - since) * 1000)
            tally.last_success = now
        else:
            tally.errors[http_reason(status, body)] += 1

    async def _open_worker(self, connection: Connection, due: asyncio.Queue[float | None]) -> None:
        while (when := await due.get()) is not None:
            await self._one(connection, when)

    async def run_open(self) -> tuple[int, float]:
        load = self._load
        total = scheduled_count(load.rate, load.seconds)
        due: asyncio.Queue[float | None] = asyncio.Queue()
        workers = [asyncio.create_task(self._open_worker(c, due)) for c in self._connections]
        start = time.perf_counter()
        sent = 0
        while sent < total:
            now_due = due_count(time.perf_counter() - start, load.rate, total)
            while sent < now_due:
                due.put_nowait(start + sent / load.rate)
                sent += 1
            if sent < total:
                await asyncio.sleep(max(0.0, start + sent / load.rate - time.perf_counter()))
        for _ in workers:
            due.put_nowait(None)
        _, pending = await asyncio.wait(workers, timeout=load.drain + load.timeout)
        for task in pending:
            task.cancel()
        unfinished = total - self._tally.finished
        if unfinished > 0:
            self._tally.errors[
                f"not answered by {load.drain + load.timeout:g}s after the last was due"
            ] += unfinished
        return total, max(load.seconds, self._tally.last_success - start)

    async def run_closed(self) -> tuple[int, float]:
        start = time.perf_counter()
        stop = start + self._load.seconds

        async def worker(connection: Connection) -> None:
            while (began := time.perf_counter()) < stop:
                await self._one(connection, began)

        await asyncio.gather(*(worker(c) for c in self._connections))
        last = self._tally.last_success
        return self._tally.finished, (last - start) if last > start else self._load.seconds

    async def run(self) -> tuple[int, float]:
        if self._load.mode == "open":
            return await self.run_open()
        return await self.run_closed()

    def close(self) -> None:
        for connection in self._connections:
            connection.close()

    def result(self, scheduled: int, elapsed: float, cpu_seconds: float) -> LoadResult:
        load, tally = self._load, self._tally
        return LoadResult(
            mode=load.mode,
            rate=load.rate if load.mode == "open" else 0.0,
            seconds=load.seconds,
            connections=load.connections,
            scheduled=scheduled,
            completed=len(tally.latencies_ms),
            elapsed=elapsed,
            latencies_ms=[round(value, 3) for value in tally.latencies_ms],
            errors=dict(tally.errors),
            statuses=dict(tally.statuses),
            cpu_seconds=cpu_seconds,
        )


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


async def _main(target: Target, workload: Workload, load: Load, wait_for_go: bool) -> int:
    runner = Runner(target, workload, load)
    try:
        await runner.prepare()
    except Exception as error:
        runner.close()
        _emit({"event": "failed", "reason": exception_reason(error)})
        return 1
    if wait_for_go:
        _emit({"event": READY})
        # Blocking is fine: nothing else is to be done until the caller has read its counters.
        if sys.stdin.readline().strip() != GO:
            runner.close()
            return 1
    cpu = time.process_time()
    scheduled, elapsed = await runner.run()
    cpu = time.process_time() - cpu
    if wait_for_go:
        _emit({"event": DONE})
    runner.close()
    _emit(asdict(runner.result(scheduled, elapsed, cpu)))
    return 0


# -- command line and the process wrapper ----------------------------------------------------


def arguments(target: Target, workload: Workload, load: Load) -> list[str]:
    """The command-line arguments of ``python -m loadtest.loadgen`` for a run (the token goes
    through the environment, ``LOADGEN_TOKEN``, so that it does not show in ``ps``)."""
    args = [
        f"--host={target.host}",
        f"--port={target.port}",
        f"--ca={target.ca}",
        f"--cert={target.cert}",
        f"--key={target.key}",
        f"--kind={workload.kind}",
        f"--accounts={','.join(workload.accounts)}",
        f"--amount={workload.amount}",
        f"--currency={workload.currency}",
        f"--mode={load.mode}",
        f"--rate={load.rate}",
        f"--seconds={load.seconds}",
        f"--connections={load.connections}",
        f"--timeout={load.timeout}",
        f"--drain={load.drain}",
    ]
    if not target.check_hostname:
        args.append("--no-check-hostname")
    return args


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's docstring as written, and every option's default."""


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[Target, Workload, Load, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", type=Path, required=True, help="CA (bundle) to verify with")
    parser.add_argument("--cert", type=Path, required=True, help="client certificate chain")
    parser.add_argument("--key", type=Path, required=True, help="client private key")
    parser.add_argument(
        "--no-check-hostname",
        action="store_true",
        help="verify the chain only (servers identified by a SPIFFE URI SAN, not a host name)",
    )
    parser.add_argument("--kind", choices=("read", "transfer"), default="read")
    parser.add_argument("--accounts", default="acc-alice-cny,acc-alice-savings")
    parser.add_argument("--amount", default="0.01")
    parser.add_argument("--currency", default="CNY")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (open loop)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="open loop: answers are awaited drain + timeout s after the last is due",
    )
    parser.add_argument(
        "--wait-for-go",
        action="store_true",
        help='print {"event": "ready"} once connected, start on a "go" line on stdin, and'
        ' print {"event": "done"} after the last answer (for run_in_process)',
    )
    args = parser.parse_args(argv)
    first, second = args.accounts.split(",")
    target = Target(args.host, args.port, args.ca, args.cert, args.key, not args.no_check_hostname)
    workload = Workload(
        args.kind, os.environ.get(TOKEN_ENV, ""), (first, second), args.amount, args.currency
    )
    load = Load(args.mode, args.seconds, args.connections, args.rate, args.timeout, args.drain)
    return target, workload, load, args.wait_for_go


def main(argv: Sequence[str] | None = None) -> int:
    target, workload, load, wait_for_go = parse_arguments(argv)
    return asyncio.run(_main(target, workload, load, wait_for_go))


def _line(process: subprocess.Popen[str], stderr: Any) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait()
        stderr.seek(0)
        raise LoadgenError(
            f"the load generator exited ({process.returncode}): {stderr.read()[-2000:]}"
        )
    document: dict[str, Any] = json.loads(line)
    if document.get("event") == "failed":
        raise LoadgenError(f"the load generator could not start: {document['reason']}")
    return document


def run_in_process(
    target: Target,
    workload: Workload,
    load: Load,
    on_ready: Callable[[int], None] = lambda pid: None,
    on_done: Callable[[int], None] = lambda pid: None,
) -> LoadResult:
    """Run one load in a child process; ``on_ready(pid)`` is called once it is connected, just
    before the first request, and ``on_done(pid)`` right after the last answer."""
    environment = dict(os.environ)
    environment[TOKEN_ENV] = workload.token
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "loadtest.loadgen", *arguments(target, workload, load)]
    with (
        tempfile.TemporaryFile("w+") as stderr,
        subprocess.Popen(
            [*command, "--wait-for-go"],
            cwd=REPO_ROOT,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        assert process.stdin is not None
        try:
            _line(process, stderr)  # ready
            on_ready(process.pid)
            process.stdin.write(GO + "\n")
            process.stdin.flush()
            _line(process, stderr)  # done
            on_done(process.pid)
            result = LoadResult.from_json(_line(process, stderr))
        except BaseException:
            process.kill()
            raise
        process.stdin.close()
        if process.wait(30) != 0:
            stderr.seek(0)
            raise LoadgenError(f"the load generator failed: {stderr.read()[-2000:]}")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
