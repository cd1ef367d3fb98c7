"""What the labs share: a teller SVID minted for them, and the gateway's audit read back
(native stack, ``ZTBANK_HOME``)."""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from services._proto import issuer_admin_pb2 as pb
from services.cli.errors import CliError
from services.cli.teller import TellerClient
from services.common.files import PRIVATE_MODE, write_atomic
from services.common.identity.source import SvidMaterial, svid_from_pem
from services.common.tls import pem_client_context
from services.common.workloads import GATEWAY, TELLER
from services.issuer.admin_client import AdminCallError, call_admin
from services.stack.native import NativeStack, StackSettings

Say = Callable[[str], None]  # where a lab narrates, a line at a time
# Signals that end a lab from outside (``kill``, a closed terminal) besides Ctrl-C.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The gateway may write the record of a refused handshake just after the client has seen the
# connection close.
AUDIT_WAIT_SECONDS = 3.0
POLL_SECONDS = 0.05
PRESENT_TIMEOUT = 5.0
ACCOUNTS = "/v1/accounts"


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


def mint_teller_svid(settings: StackSettings, ttl_seconds: int) -> SvidMaterial:
    """A teller SVID of its own for a lab client, minted through the issuer's admin API."""
    spiffe_id = str(TELLER.spiffe_id(settings.trust_domain))
    request = pb.MintX509SVIDRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
    try:
        minted = call_admin(settings.admin_socket, lambda stub: stub.MintX509SVID(request))
    except AdminCallError as error:
        raise CliError(f"cannot mint a teller SVID for the lab: {error}") from None
    return svid_from_pem(minted.chain_pem, minted.key_pem, minted.bundle_pem, settings.trust_domain)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupted_by_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, while a lab holds the stack
    changed: their default action would end the process without running the ``finally`` that
    puts the stack back."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass(frozen=True)
class Outcome:
    answer: str  # "HTTP 200", "refused in the handshake", "closed after the handshake"
    local_port: int  # finds the gateway's record of this connection in its audit


def present(
    address: tuple[str, int], chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, token: str
) -> Outcome:
    """GET /v1/accounts on a new TLS connection, presenting ``chain_pem`` whatever it holds
    (the labs present certificates the gateway must refuse)."""
    context = pem_client_context(chain_pem, key_pem, bundle_pem, ["http/1.1"])
    raw = socket.create_connection(address, timeout=PRESENT_TIMEOUT)
    local_port = int(raw.getsockname()[1])
    try:
        try:
            tls = context.wrap_socket(raw)
        except OSError:
            return Outcome("refused in the handshake", local_port)
        connection = http.client.HTTPConnection(*address, timeout=PRESENT_TIMEOUT)
        connection.sock = tls
        try:
            connection.request("GET", ACCOUNTS, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            return Outcome("closed after the handshake", local_port)
        return Outcome(f"HTTP {response.status}", local_port)
    finally:
        raw.close()


@dataclass(frozen=True)
class FileBackup:
    """The original of a file a lab edits live (the policy, the trust table), kept beside the
    stack's state while the edit is in place: a run killed outright leaves it, and the next run
    restores it first."""

    path: Path  # the file the running services watch
    content: bytes
    mode: int
    name: str  # which lab's backup: ``ZTBANK_HOME/run/lab-NAME.original.json``

    @staticmethod
    def file(settings: StackSettings, name: str) -> Path:
        return settings.run_dir / f"lab-{name}.original.json"

    @classmethod
    def of(cls, path: Path, name: str) -> FileBackup:
        """What ``path`` holds now (its bytes must be text: the backup is JSON)."""
        try:
            content = path.read_bytes()
            content.decode()
            return cls(path, content, stat.S_IMODE(os.stat(path).st_mode), name)
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"cannot read {path}: {error}") from None

    def save(self, settings: StackSettings) -> None:
        record = {"path": str(self.path), "mode": self.mode, "content": self.content.decode()}
        write_atomic(self.file(settings, self.name), json.dumps(record).encode(), PRIVATE_MODE)

    @classmethod
    def load(cls, settings: StackSettings, name: str) -> FileBackup | None:
        kept = cls.file(settings, name)
        try:
            record = json.loads(kept.read_text())
            return cls(Path(record["path"]), record["content"].encode(), int(record["mode"]), name)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CliError(
                f"{kept} (a file an earlier lab run kept) is unreadable: {error};"
                " check the file it names and remove it"
            ) from None

    def restore(self, settings: StackSettings) -> None:
        write_atomic(self.path, self.content, self.mode)
        self.file(settings, self.name).unlink(missing_ok=True)


def watched_file(stack: NativeStack, variable: str, default: Path, what: str) -> Path:
    """The file the running gateway reads for ``variable`` (its policy, its trust table), from
    the environment it was started with."""
    env = stack.services[GATEWAY.name].environment()
    if env is None:
        raise CliError("the gateway is not running here; is the stack up? (make up)")
    if env.get("CONSUL_HTTP_ADDR"):
        raise CliError(
            f"this gateway reads its {what} from Consul: the lab runs on the native stack"
        )
    return Path(env.get(variable) or default)


def accounts_served(
    client: TellerClient, token: str, connection: http.client.HTTPSConnection | None = None
) -> bool:
    """GET /v1/accounts as ``token``'s customer answered 200, on ``connection`` (kept open) or
    on a new connection (which meets the certificate served right now)."""
    try:
        reply = client.request(
            "GET", ACCOUNTS, headers={"Authorization": f"Bearer {token}"}, connection=connection
        )
    except CliError:
        return False
    return reply.status == 200


def service_pids(stack: NativeStack) -> dict[str, int | None]:
    """Each service's pid: the same before and after a lab means nothing was restarted."""
    return {name: process.pid() for name, process in stack.services.items()}


def unrestarted(stack: NativeStack, pids: dict[str, int | None], say: Say, step: int) -> bool:
    """Lab step ``step``: whether every service still runs as the process it was (``pids``,
    from ``service_pids`` before the lab), said either way."""
    same = service_pids(stack) == pids
    say(f"  {step} {'no service was restarted' if same else 'a service was RESTARTED'}")
    return same


def verdict(say: Say, checks: Sequence[bool], passed: Sequence[str]) -> bool:
    """A lab's last lines: ``passed`` when every check held, else where to look."""
    if all(checks):
        for line in passed:
            say(line)
        return True
    say("lab failed: see the steps above")
    return False


@contextmanager
def policy_lock(settings: StackSettings) -> Iterator[None]:
    """Held by whatever edits the policy file the gateway watches (``workload add/remove``, the
    policy lab) from reading it to writing it back: two edits at once would lose one."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(settings.run_dir / "policy.lock", os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by close, also if we are killed
        yield
    finally:
        os.close(descriptor)
