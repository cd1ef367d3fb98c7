"""What the labs share: a teller SVID minted for them, the gateway's audit read back, the live
files they edit and put back, how they wait and give their verdict, and the one lab lock that
lets one lab run at a time (native stack, or beside the compose stack, ``ZTBANK_HOME``)."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from services._proto import issuer_admin_pb2 as pb
from services.common.discovery.registry import FileRegistry
from services.common.files import PRIVATE_MODE, write_atomic
from services.common.identity.source import SvidMaterial, svid_from_pem
from services.common.identity.workloads import GATEWAY, SERVICES, TELLER
from services.common.mtls.contexts import pem_client_context
from services.common.polling import poll_until
from services.issuer.admin_client import AdminCallError, call_admin
from services.labs.errors import LabError, LabUsageError
from services.labs.teller import TellerClient
from services.stack.native import NativeStack, StackSettings
from services.stack.probe import metric_sample

Say = Callable[[str], None]  # where a lab narrates, a line at a time
# Signals that end a lab from outside (``kill``, a closed terminal) besides Ctrl-C.
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The gateway may write the record of a refused handshake just after the client has seen the
# connection close.
AUDIT_WAIT_SECONDS = 3.0
POLL_SECONDS = 0.05
LOCK_MODE = 0o644
PRESENT_TIMEOUT = 5.0
ACCOUNTS = "/v1/accounts"


def _last_denial(settings: StackSettings, fields: dict[str, object]) -> str | None:
    path = settings.home_of(GATEWAY.name) / "audit" / f"{GATEWAY.name}.jsonl"
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
    return poll_until(
        lambda: _last_denial(settings, fields), timeout=AUDIT_WAIT_SECONDS, interval=POLL_SECONDS
    )


def seconds_until(check: Callable[[], bool], budget: float, interval: float) -> float | None:
    """How long ``check`` took to hold, asked every ``interval`` seconds (None: not within
    ``budget``): what a lab reports of each change it waits for."""
    started = time.monotonic()
    if not poll_until(check, timeout=budget, interval=interval):
        return None
    return time.monotonic() - started


def mint_teller_svid(settings: StackSettings, ttl_seconds: int) -> SvidMaterial:
    """A teller SVID of its own for a lab client, minted through the issuer's admin API."""
    spiffe_id = str(TELLER.spiffe_id(settings.trust_domain))
    request = pb.MintX509SVIDRequest(spiffe_id=spiffe_id, ttl_seconds=ttl_seconds)
    try:
        minted = call_admin(settings.admin_socket, lambda stub: stub.MintX509SVID(request))
    except AdminCallError as error:
        raise LabError(f"cannot mint a teller SVID for the lab: {error}") from None
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
    # uid, gid: a lab running as root beside the compose stack edits files that a service of
    # another uid reads; the edit and the original keep that owner.
    owner: tuple[int, int] | None = None

    @staticmethod
    def file(settings: StackSettings, name: str) -> Path:
        return settings.run_dir / f"lab-{name}.original.json"

    @classmethod
    def of(cls, path: Path, name: str) -> FileBackup:
        """What ``path`` holds now (its bytes must be text: the backup is JSON)."""
        try:
            content = path.read_bytes()
            content.decode()
            status = os.stat(path)
            owner = (status.st_uid, status.st_gid)
            return cls(path, content, stat.S_IMODE(status.st_mode), name, owner)
        except (OSError, UnicodeDecodeError) as error:
            raise LabError(f"cannot read {path}: {error}") from None

    def save(self, settings: StackSettings) -> None:
        record = {
            "path": str(self.path),
            "mode": self.mode,
            "owner": self.owner,
            "content": self.content.decode(),
        }
        write_atomic(self.file(settings, self.name), json.dumps(record).encode(), PRIVATE_MODE)

    @classmethod
    def load(cls, settings: StackSettings, name: str) -> FileBackup | None:
        kept = cls.file(settings, name)
        try:
            record = json.loads(kept.read_text())
            owner = record.get("owner")
            return cls(
                Path(record["path"]),
                record["content"].encode(),
                int(record["mode"]),
                name,
                (int(owner[0]), int(owner[1])) if owner else None,
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise LabError(
                f"{kept} (a file an earlier lab run kept) is unreadable: {error};"
                " check the file it names and remove it"
            ) from None

    def replace(self, content: bytes) -> None:
        """Put ``content`` in place of the file, atomically, with its mode and owner."""
        write_atomic(self.path, content, self.mode, owner=self._owner_to_keep())

    def restore(self, settings: StackSettings) -> None:
        self.replace(self.content)
        self.file(settings, self.name).unlink(missing_ok=True)

    def _owner_to_keep(self) -> tuple[int, int] | None:
        """The original owner where a new file would get another (only root can give it)."""
        if self.owner is None or self.owner == (os.geteuid(), os.getegid()):
            return None
        return self.owner


def watched_file(stack: NativeStack, variable: str, default: Path, what: str) -> Path:
    """The file the running gateway reads for ``variable`` (its policy, its trust table): from
    the environment it was started with, or beside the compose stack the one the lab is told
    (compose.yaml gives the lab and the services the same shared file)."""
    if stack.settings.stack_kind == "compose":
        if os.environ.get("CONSUL_HTTP_ADDR"):
            raise LabError(f"this stack reads its {what} from Consul: edit it there")
        return default
    env = stack.services[GATEWAY.name].environment()
    if env is None:
        raise LabError("the gateway is not running here; is the stack up? (make up)")
    if env.get("CONSUL_HTTP_ADDR"):
        raise LabError(
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
    except LabError:
        return False
    return reply.status == 200


def service_starts(settings: StackSettings) -> dict[str, float | None]:
    """When each service's process started (its ``process_start_time_seconds``): the same
    before and after a lab means nothing was restarted, natively or in containers."""
    registry = FileRegistry(settings.registry)
    return {
        w.name: metric_sample(registry.lookup(w.name), "process_start_time_seconds")
        for w in SERVICES
    }


def issuer_started(settings: StackSettings) -> str | None:
    """When the issuer's process started, from its admin API (None: it does not answer)."""
    try:
        return call_admin(settings.admin_socket, lambda s: s.Status(pb.StatusRequest())).started
    except AdminCallError:
        return None


def unrestarted(
    before: Mapping[str, object], after: Mapping[str, object], say: Say, step: int
) -> bool:
    """Lab step ``step``: whether every process still is the one it was (start times taken
    before and after the lab; an unknown one proves nothing), said either way."""
    same = before == after and None not in before.values()
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


def _open_read_only(lock: Path) -> int:
    try:
        return os.open(lock, os.O_RDONLY)
    except OSError as error:
        raise LabError(f"cannot take the policy lock {lock}: {error}") from None


@contextmanager
def policy_lock(settings: StackSettings) -> Iterator[None]:
    """Held by whatever edits the policy file the gateway watches (``workload add/remove``, the
    policy lab) from reading it to writing it back: two edits at once would lose one."""
    lock = settings.run_dir / "policy.lock"
    try:
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        # Readable by all (it holds nothing), so that a lock file made by another uid sharing
        # this state (a lab run as root beside the compose stack, the issuer's uid in its
        # container) can be opened read-only: flock needs no write access.
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, LOCK_MODE)
    except PermissionError:
        descriptor = _open_read_only(lock)
    except OSError as error:
        raise LabError(f"cannot take the policy lock {lock}: {error}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by close, also if we are killed
        yield
    finally:
        os.close(descriptor)


# -- the one lab lock ---------------------------------------------------------------------------

LAB_LOCK_FILE = "lab.lock"
# Set by the console for the ``ztbank lab NAME`` it starts: the descriptor of the lab lock the
# console took for that lab (inherited), which the lab holds as its own instead of taking it.
LAB_LOCK_FD = "ZTBANK_LAB_LOCK_FD"
HOLDERS = {"cli": "the CLI", "console": "the console"}


class LabRunningError(LabUsageError):
    """Another lab holds the stack's lab lock: one lab at a time, and this one did not start."""


@dataclass(frozen=True)
class LabHolder:
    """What the lab lock's file says of the lab holding it."""

    lab: str
    pid: int
    since: float  # epoch seconds
    by: str  # "cli" (``ztbank lab``, ``make lab-NAME``) or "console"

    def refusal(self) -> str:
        """The one line that refuses a second lab."""
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        by = HOLDERS.get(self.by, self.by)
        return (
            f"lab {self.lab!r} is running (since {since}, pid {self.pid}, started from {by}):"
            " one lab at a time"
        )


class LabLock:
    """The stack's one lab lock, ``ZTBANK_HOME/run/lab.lock``: flock(2) on it, held by whatever
    runs a lab (``ztbank lab``, hence ``make lab-NAME``, and the console) for the whole run, and
    not waited for: a second lab is refused at once (LabRunningError).  The file says which lab
    holds it, its pid and since when (JSON).  The kernel releases the lock when the holder's
    last descriptor closes, however it ends: a killed lab leaves no stale lock.  (``policy_lock``
    is another lock: edits of the policy file take turns on it.)"""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @staticmethod
    def file(settings: StackSettings) -> Path:
        return settings.run_dir / LAB_LOCK_FILE

    @classmethod
    def take(cls, settings: StackSettings, lab: str, by: str) -> LabLock:
        """The lock for ``lab`` run from ``by`` ("cli" or "console"), or LabRunningError naming
        the lab that holds it."""
        path = cls.file(settings)
        try:
            settings.run_dir.mkdir(parents=True, exist_ok=True)
            # Readable by all (it holds no secret), so that another uid sharing this state (a lab
            # run as root beside the compose stack) can open it read-only: flock needs no write.
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_MODE)
        except PermissionError:
            descriptor = _open_lock_read_only(path)
        except OSError as error:
            raise LabError(f"cannot take the lab lock {path}: {error}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = _holder_refusal(path, descriptor)
            os.close(descriptor)
            raise LabRunningError(refusal) from None
        except OSError as error:
            os.close(descriptor)
            raise LabError(f"cannot take the lab lock {path}: {error}") from None
        lock = cls(path, descriptor)
        lock.record(lab, by)
        return lock

    @classmethod
    def handed_over(cls, settings: StackSettings, descriptor_text: str, lab: str) -> LabLock:
        """The lock the console took for ``lab`` and handed to this process as the descriptor
        ``descriptor_text`` (LAB_LOCK_FD): checked to be this stack's lab lock, and held."""
        path = cls.file(settings)
        wrong = f"{LAB_LOCK_FD}={descriptor_text} is not a lab lock of the stack in {path.parent}"
        try:
            descriptor = int(descriptor_text)
            handed, ours = os.fstat(descriptor), os.stat(path)
        except (ValueError, OSError):
            raise LabUsageError(f"{wrong}: the console sets it for the labs it starts") from None
        if (handed.st_dev, handed.st_ino) != (ours.st_dev, ours.st_ino):
            raise LabUsageError(f"{wrong}: the console sets it for the labs it starts")
        try:
            # Succeeds at once when the descriptor's open file holds the lock (the console's).
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LabRunningError(_holder_refusal(path, descriptor)) from None
        os.set_inheritable(descriptor, False)  # not to what the lab starts (the issuer)
        lock = cls(path, descriptor)
        lock.record(lab, "console")
        return lock

    def fileno(self) -> int:
        if self._descriptor is None:
            raise ValueError("the lab lock was released")
        return self._descriptor

    def record(self, lab: str, by: str) -> None:
        """Say in the file that ``lab``, run by this process from ``by``, holds the lock."""
        holder = {"lab": lab, "pid": os.getpid(), "since": time.time(), "by": by}
        data = json.dumps(holder).encode() + b"\n"
        # Opened read-only (another uid's file): nothing is said, the lock holds all the same.
        with contextlib.suppress(OSError):
            # One write, so that a refused lab reads the old record or this one, whole.
            os.pwrite(self.fileno(), data, 0)
            os.ftruncate(self.fileno(), len(data))

    def release(self) -> None:
        """Give the lock up (what the file said goes with it); again: nothing."""
        if self._descriptor is None:
            return
        descriptor, self._descriptor = self._descriptor, None
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, 0)
        finally:
            os.close(descriptor)

    def __enter__(self) -> LabLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _open_lock_read_only(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as error:
        raise LabError(f"cannot take the lab lock {path}: {error}") from None


def read_lab_holder(descriptor: int) -> LabHolder | None:
    """What the lock file open as ``descriptor`` says of its holder (None: nothing readable,
    e.g. a holder that has not written it yet)."""
    try:
        record = json.loads(os.pread(descriptor, 4096, 0).split(b"\n", 1)[0])
        return LabHolder(
            str(record["lab"]), int(record["pid"]), float(record["since"]), str(record["by"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _holder_refusal(path: Path, descriptor: int) -> str:
    holder = read_lab_holder(descriptor)
    if holder is None:
        return f"another lab is running (it holds {path}): one lab at a time"
    return holder.refusal()


def check_stack_running(settings: StackSettings) -> None:
    """Refuse (LabUsageError, one line) a lab on a native stack that is not running, or not all
    of it, before the lab changes anything; beside the compose stack the lab finds out itself."""
    if settings.stack_kind != "native":
        return
    stack = NativeStack(settings)
    processes = [stack.issuer, *stack.services.values()]
    if stack.recorded_upstream() == "vault":
        processes.insert(0, stack.vault.process)
    stopped = [process.name for process in processes if not process.running()]
    home = settings.home
    if len(stopped) == len(processes):
        raise LabUsageError(
            f"no stack runs in ZTBANK_HOME={home}: start it with `make up` in the checkout,"
            " or set ZTBANK_HOME to the home of a running stack"
        )
    if stopped:
        raise LabUsageError(
            f"the stack in ZTBANK_HOME={home} is not all running ({', '.join(stopped)} stopped):"
            " `make up` starts what is missing"
        )
