"""A full disk, for real: the stack's state on small tmpfs mounts, filled to the last byte.

A private native stack (``services.stack.sandbox``'s settings: a temp dir, free ports) is started
with three directories of its ZTBANK_HOME on filesystems of their own, mounted before any
service starts: the audit logs (``audit/``), the transfer-engine's ledger (``transfer-engine/``)
and risk's velocity history (``risk/``).  Each scenario fills one of them with a filler file and
checks what a customer sees (a 503 problem+json naming the cause), what the gRPC hop answers
(UNAVAILABLE and the cause), that no audit line is torn and no money moved; then it deletes the
filler and checks that the same requests, retried with their keys, post exactly once, without a
restart.

Mounting needs root (CI runs the tests as root): elsewhere, or where ``mount`` is refused (a
container without CAP_SYS_ADMIN), the module skips, saying why.  It starts its own stack, so it
runs with ``make test-e2e`` only, not against an existing stack.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from services._proto import ledger_pb2, risk_pb2
from services.common.discovery.registry import FileRegistry
from services.common.identity.workloads import GATEWAY, RISK, SERVICES, TRANSFER_ENGINE
from services.common.settings import load_settings
from services.labs.teller import Reply, TellerClient
from services.stack.native import NativeStack, workload_svid
from services.stack.sandbox import sandbox_settings
from tests.e2e.conftest import RPC_TIMEOUT, E2EStack
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment

pytestmark = pytest.mark.e2e

# Room for everything the stack writes before a scenario fills its mount (the ledger's WAL
# grows by a few pages per transfer until its first checkpoint at 1000 pages).
TMPFS_SIZE = "4m"
AUDIT, LEDGER, RISK_STORE = "audit", "transfer-engine", "risk"  # directories under ZTBANK_HOME
ALICE, BOB = "alice", "bob"
ALICE_CNY, ALICE_SAVINGS, BOB_CNY = "acc-alice-cny", "acc-alice-savings", "acc-bob-cny"
TRANSFERS = "/v1/transfers"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
CREATE_TRANSFER = "/ztbank.ledger.v1.TransferEngine/CreateTransfer"
DISK_FULL = "database or disk is full"  # SQLite's words for ENOSPC
AUDIT_FULL = "audit log not writable: no space left on device"
RISK_FULL = f"risk store not writable: {DISK_FULL}"
LEDGER_FULL = f"the ledger's storage failed: {DISK_FULL}"
# An audit record is over 500 bytes; the last block of a file has less than 4096 unused.
ROOM_FOR_RECORDS = 4096 // 500 + 1

T = TypeVar("T")


# -- mounts ----------------------------------------------------------------------------------


def mount_tmpfs(directory: Path) -> None:
    """A tmpfs of TMPFS_SIZE on ``directory``; skips the module where that cannot be done."""
    directory.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs"]
    try:
        done = subprocess.run(
            [*command, str(directory)], capture_output=True, text=True, check=False, timeout=30
        )
    except FileNotFoundError:
        pytest.skip("a real full disk needs mount(8), which is not installed")
    if done.returncode != 0:
        pytest.skip(
            f"a real full disk needs a tmpfs; `mount -t tmpfs` was refused: {done.stderr.strip()}"
        )


def unmount(directory: Path) -> str:
    """Unmount ``directory`` (lazily if something still holds it); '' or why it failed."""
    for command in (["umount", str(directory)], ["umount", "--lazy", str(directory)]):
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)
        if done.returncode == 0:
            return ""
    return done.stderr.strip()


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1):  # big writes, then the bytes left in the last page
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0, f"{directory} still has room"
    return filler


# -- the stack -------------------------------------------------------------------------------


@dataclass
class FullDiskStack:
    e2e: E2EStack
    native: NativeStack
    teller: TellerClient
    tokens: dict[str, str]  # a bearer token per customer, made while there was room to audit

    def mount(self, name: str) -> Path:
        return self.native.settings.home / name

    def post(self, customer: str, body: dict[str, str], key: str) -> Reply:
        headers = {"Authorization": f"Bearer {self.tokens[customer]}", "Idempotency-Key": key}
        return self.teller.request("POST", TRANSFERS, body=body, headers=headers)

    def balances(self) -> dict[str, Decimal]:
        found: dict[str, Decimal] = {}
        for customer in (ALICE, BOB):
            headers = {"Authorization": f"Bearer {self.tokens[customer]}"}
            reply = self.teller.request("GET", "/v1/accounts", headers=headers)
            assert reply.status == 200, reply
            found |= {a["id"]: Decimal(a["balance"]) for a in reply.body["accounts"]}
        return found

    def rpc(self, service: str, caller: str, method: str, request: Any, reply_type: Any) -> Any:
        """One unary call as ``caller``; its reply, or its grpc.Call error."""
        with self.e2e.grpc_channel(service, self.e2e.svid(caller)) as channel:
            call = channel.unary_unary(
                method,
                request_serializer=type(request).SerializeToString,
                response_deserializer=reply_type.FromString,
            )
            try:
                return call(request, timeout=RPC_TIMEOUT)
            except grpc.RpcError as error:
                if not isinstance(error, grpc.Call):  # every unary call error is one
                    raise
                return error

    def logs(self) -> dict[str, str]:
        log_dir = self.native.settings.home / "log"
        return {w.name: (log_dir / f"{w.name}.log").read_text() for w in SERVICES}


@pytest.fixture(scope="module")
def disk() -> Iterator[FullDiskStack]:
    if load_settings(E2ETargetSettings).stack == "existing":
        pytest.skip("fills the disks of a stack of its own, mounted before it starts (test-e2e)")
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, and mounting needs root (CI is root)")
    root = Path(tempfile.mkdtemp(prefix="ztd", dir="/tmp"))
    settings = sandbox_settings(root)
    mounted: list[Path] = []
    env = pytest.MonkeyPatch()
    try:
        for name in (AUDIT, LEDGER, RISK_STORE):
            mount_tmpfs(settings.home / name)
            mounted.append(settings.home / name)
        scrub_environment(env)  # the stack's processes inherit this process's environment
        native = NativeStack(settings)
        try:
            native.up()
            e2e = E2EStack(
                settings=settings,
                addresses=FileRegistry(settings.registry).services(),
                target=E2ETargetSettings(),
                identity=partial(workload_svid, settings),
                native=native,
            )
            teller = e2e.teller()
            tokens = {customer: teller.token(customer) for customer in (ALICE, BOB)}
            yield FullDiskStack(e2e, native, teller, tokens)
        finally:
            native.down()
    finally:
        env.undo()
        failures = [f"{path}: {why}" for path in reversed(mounted) if (why := unmount(path))]
        shutil.rmtree(root, ignore_errors=True)
        assert not failures, f"could not unmount: {failures}"


# -- checks ----------------------------------------------------------------------------------


def order(source: str, target: str, amount: str) -> dict[str, str]:
    return {"from_account": source, "to_account": target, "amount": amount, "currency": "CNY"}


def new_key() -> str:
    return f"disk-full-{uuid.uuid4()}"


def until_refused(attempt: Callable[[], T], refused: Callable[[T], bool]) -> T:
    """The first outcome of ``attempt`` that ``refused`` says is a refusal; tried at most as
    many times as records can fit in the unused end of a log's last block."""
    for _ in range(ROOM_FOR_RECORDS):
        outcome = attempt()
        if refused(outcome):
            return outcome
    pytest.fail(f"not refused after {ROOM_FOR_RECORDS} tries; the last answer: {outcome}")


def assert_unavailable(reply: Reply, detail: str) -> None:
    """A 503 problem+json whose detail names the cause, and a Retry-After."""
    assert reply.status == 503, reply
    assert reply.headers["content-type"].startswith("application/problem+json"), reply
    assert isinstance(reply.body, dict), reply
    assert (reply.body["status"], reply.body["detail"]) == (503, detail), reply
    assert int(reply.headers["retry-after"]) > 0, reply


def assert_rpc_unavailable(outcome: Any, details: str) -> None:
    assert isinstance(outcome, grpc.Call), outcome
    assert (outcome.code(), outcome.details()) == (grpc.StatusCode.UNAVAILABLE, details)


def assert_posts_once(disk: FullDiskStack, customer: str, body: dict[str, str], key: str) -> str:
    """The retry of a refused request posts; the one after it replays: its transfer id."""
    posted = disk.post(customer, body, key)
    assert (posted.status, posted.body["status"]) == (201, "posted"), posted
    assert "idempotent-replayed" not in posted.headers, posted
    again = disk.post(customer, body, key)
    assert (again.status, again.body["id"]) == (201, posted.body["id"]), again
    assert again.headers.get("idempotent-replayed") == "true", again
    return str(posted.body["id"])


def assert_whole_audit_lines(disk: FullDiskStack) -> int:
    """Every line of every audit log parses, the last one too: no torn record.  Their count."""
    count = 0
    for log in sorted(disk.mount(AUDIT).glob("*.jsonl")):
        text = log.read_text()
        assert not text or text.endswith("\n"), f"{log} ends in a torn record: {text[-200:]!r}"
        for number, line in enumerate(text.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                pytest.fail(f"{log}:{number} is not a JSON record: {line!r}")
            count += 1
    return count


def assert_no_traceback(disk: FullDiskStack) -> None:
    for service, text in disk.logs().items():
        assert "Traceback" not in text, f"{service} logged a traceback:\n{text[-3000:]}"


def moved(before: dict[str, Decimal], after: dict[str, Decimal]) -> dict[str, Decimal]:
    return {account: after[account] - before[account] for account in before}


# -- scenarios -------------------------------------------------------------------------------


def test_risk_store_full_is_a_503_with_the_cause_and_retries_post_once(
    disk: FullDiskStack,
) -> None:
    before = disk.balances()
    body, key = order(ALICE_CNY, BOB_CNY, "1.25"), new_key()
    filler = fill(disk.mount(RISK_STORE))
    try:
        refused = disk.post(ALICE, body, key)
        hop = disk.rpc(
            RISK.name,
            TRANSFER_ENGINE.name,
            ASSESS,
            risk_pb2.AssessRequest(
                transfer_id="tr-disk-full",
                customer=ALICE,
                from_account=ALICE_CNY,
                to_account=BOB_CNY,
                amount_minor=125,
                currency="CNY",
            ),
            risk_pb2.Assessment,
        )
        held = disk.balances()  # reads need no risk
    finally:
        filler.unlink()

    assert_unavailable(
        refused, f"the transfer-engine is unavailable: risk service unavailable: {RISK_FULL}"
    )
    assert_rpc_unavailable(hop, RISK_FULL)
    assert held == before, "a transfer risk could not assess moved money"
    # Space is back: no restart, and the same request posts, once.
    assert_posts_once(disk, ALICE, body, key)
    assert moved(before, disk.balances()) == {
        ALICE_CNY: Decimal("-1.25"),
        ALICE_SAVINGS: Decimal(0),
        BOB_CNY: Decimal("1.25"),
    }
    warnings = [
        json.loads(line)
        for line in disk.logs()[RISK.name].splitlines()
        if "not assessed" in line and line.startswith("{")
    ]
    assert warnings, "risk did not say why it refused"
    assert {(w["level"], w["message"].split(": ", 1)[1]) for w in warnings} == {
        ("warning", RISK_FULL)
    }
    assert_no_traceback(disk)


def test_ledger_full_is_a_503_and_retries_post_once(disk: FullDiskStack) -> None:
    before = disk.balances()
    body, key = order(ALICE_SAVINGS, BOB_CNY, "2.50"), new_key()
    direct = ledger_pb2.CreateTransferRequest(
        customer=ALICE,
        idempotency_key=new_key(),
        from_account=ALICE_SAVINGS,
        to_account=BOB_CNY,
        amount_minor=50,
        currency="CNY",
    )
    filler = fill(disk.mount(LEDGER))
    try:
        refused = disk.post(ALICE, body, key)
        hop = disk.rpc(
            TRANSFER_ENGINE.name, GATEWAY.name, CREATE_TRANSFER, direct, ledger_pb2.Transfer
        )
        held = disk.balances()  # reads need no room
    finally:
        filler.unlink()

    assert_unavailable(refused, f"the transfer-engine is unavailable: {LEDGER_FULL}")
    assert_rpc_unavailable(hop, LEDGER_FULL)
    assert held == before, "a transfer the ledger could not store moved money"
    assert_posts_once(disk, ALICE, body, key)
    again = disk.rpc(
        TRANSFER_ENGINE.name, GATEWAY.name, CREATE_TRANSFER, direct, ledger_pb2.Transfer
    )
    assert isinstance(again, ledger_pb2.Transfer), again
    assert (again.status, again.replayed) == ("posted", False)
    replay = disk.rpc(
        TRANSFER_ENGINE.name, GATEWAY.name, CREATE_TRANSFER, direct, ledger_pb2.Transfer
    )
    assert (replay.id, replay.replayed) == (again.id, True)
    assert moved(before, disk.balances()) == {
        ALICE_CNY: Decimal(0),
        ALICE_SAVINGS: Decimal("-3.00"),
        BOB_CNY: Decimal("3.00"),
    }
    assert_no_traceback(disk)


def test_audit_full_is_a_503_with_the_cause_no_torn_record_and_retries_post_once(
    disk: FullDiskStack,
) -> None:
    before = disk.balances()
    records_before = assert_whole_audit_lines(disk)
    body, key = order(BOB_CNY, ALICE_CNY, "0.75"), new_key()
    # Refused by the gateway's app (422) after its audit record, which is the transfer's size.
    shaped_like_it = order(BOB_CNY, ALICE_CNY, "-0.75")
    invalid_assessment = risk_pb2.AssessRequest(
        transfer_id="tr-audit-full",
        customer=BOB,
        from_account=BOB_CNY,
        to_account=ALICE_CNY,
        amount_minor=0,
        currency="CNY",
    )
    filler = fill(disk.mount(AUDIT))
    try:
        # A filesystem without a free block still takes bytes into the last, partly used block
        # of each file: a log's next few records may fit there.  Records of the transfer's size
        # use that room up; once one is refused, the transfer's is refused too.
        gateway_full = until_refused(
            lambda: disk.post(BOB, shaped_like_it, new_key()),
            lambda reply: reply.status != 422,
        )
        refused = disk.post(BOB, body, key)
        hop = until_refused(
            lambda: disk.rpc(
                RISK.name, TRANSFER_ENGINE.name, ASSESS, invalid_assessment, risk_pb2.Assessment
            ),
            lambda outcome: outcome.code() is not grpc.StatusCode.INVALID_ARGUMENT,
        )
        whole_while_full = assert_whole_audit_lines(disk)
    finally:
        filler.unlink()

    assert_unavailable(gateway_full, AUDIT_FULL)
    assert_unavailable(refused, AUDIT_FULL)
    assert_rpc_unavailable(hop, AUDIT_FULL)
    assert whole_while_full >= records_before
    assert disk.balances() == before, "a request that could not be audited moved money"
    assert_posts_once(disk, BOB, body, key)
    assert moved(before, disk.balances()) == {
        ALICE_CNY: Decimal("0.75"),
        ALICE_SAVINGS: Decimal(0),
        BOB_CNY: Decimal("-0.75"),
    }
    assert assert_whole_audit_lines(disk) > whole_while_full
    assert_no_traceback(disk)
