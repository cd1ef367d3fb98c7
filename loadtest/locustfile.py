"""Locust load profiles against the gateway, acting as the teller over mutual TLS.

Profiles are user classes, picked by name on locust's command line (``make load PROFILE=...``
does it, see ``loadtest/run.py``); the tasks are also tagged ``reads`` / ``transfers`` for
``--tags`` within a class:

* ``ReadsUser``      GET /v1/accounts and GET /v1/accounts/{id}/transactions, 1 : 1;
* ``TransfersUser``  POST /v1/transfers of 0.01 CNY back and forth between alice's two accounts;
* ``MixedUser``      3 reads : 1 transfer;
* ``VictimUser``     (chaos only, one instance) the mixed workload with its own SVID, which the
                     chaos driver revokes mid-run; its requests are named ``[victim] ...``.

Identity.  Each class presents an X509-SVID minted for the teller's SPIFFE ID by
``ztbank svid mint`` into a directory (svid.pem = leaf + chain, svid.key, bundle.pem):
``ZTBANK_LOAD_SVID`` for the tellers, ``ZTBANK_LOAD_VICTIM_SVID`` for the victim.  The gateway is
identified by its SPIFFE ID, not its host name: OpenSSL verifies its chain against bundle.pem
(no system CAs, host name checks off), then ``GatewayVerifyingContext.wrap_socket`` checks the
X509-SVID rules, that the SPIFFE ID is the gateway's and that the issuer's CRLs (polled in the
background from ``ZTBANK_ISSUER_HTTP``, as the services poll them) do not list its certificate,
on *every new connection*, right after the handshake and before a request is written; a
mismatch, a revoked certificate or stale CRLs fail that request as ``gateway identity`` and the
connection is closed.

Customers.  Each user obtains a customer token (``ZTBANK_LOAD_CUSTOMER``, default alice) at
start and a new one once 80 % of its lifetime (``expires_in``) has passed, or after a 401.
Transfers alternate direction per user so that balances never run out; the velocity rule holds
most of them for review (202), which counts as a success like 201.

Chaos.  ``ZTBANK_LOAD_RECONNECT=SECONDS`` makes the tellers close their keep-alive connection
that often (``Connection: close``), so that new handshakes see the gateway's rotated
certificates; the victim opens a new connection for every request, so that a revocation is
enforced at its very next handshake.  ``ZTBANK_LOAD_OUTCOMES=FILE`` writes, when the run stops,
every request's outcome per tenth of a second and kind of user, and the gateway certificates seen
(read by ``loadtest/chaos.py``).

The trust domain and the default gateway address come from the stack's settings
(``ZTBANK_TRUST_DOMAIN``, ``ZTBANK_REGISTRY``); ``--host`` overrides the address.
"""

from __future__ import annotations

# py-spiffe and services.* import grpc, whose core must use gevent's loop under locust: this has
# to happen before any of them is imported.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from cryptography import x509  # noqa: E402
from geventhttpclient.response import HTTPConnectionClosed  # noqa: E402
from locust import FastHttpUser, between, events, tag, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from locust.exception import CatchResponseError  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from services.common.discovery.registry import FileRegistry  # noqa: E402
from services.common.errors import CommonError  # noqa: E402
from services.common.identity.pem import serial_hex  # noqa: E402
from services.common.identity.spiffe_id import SpiffeId  # noqa: E402
from services.common.identity.workloads import GATEWAY  # noqa: E402
from services.common.identity.x509svid import verify_der_chain  # noqa: E402
from services.common.mtls.contexts import TLS12_AEAD_CIPHERS  # noqa: E402
from services.common.revocation import RevocationError, RevocationWatcher  # noqa: E402
from services.issuer.domain.revocation import crls_url  # noqa: E402
from services.stack.native import StackSettings  # noqa: E402

if TYPE_CHECKING:
    from ssl import SSLContext as _TlsContext
else:  # gevent's cooperative SSLContext, the one locust's geventhttpclient sockets need
    from gevent.ssl import SSLContext as _TlsContext

SVID_DIR = Path(os.environ.get("ZTBANK_LOAD_SVID", "var/load/teller"))
VICTIM_SVID_DIR = Path(os.environ.get("ZTBANK_LOAD_VICTIM_SVID", "var/load/victim"))
CUSTOMER = os.environ.get("ZTBANK_LOAD_CUSTOMER", "alice")
RECONNECT_SECONDS = float(os.environ.get("ZTBANK_LOAD_RECONNECT", "0"))
OUTCOMES_FILE = os.environ.get("ZTBANK_LOAD_OUTCOMES", "")
LOCUST_SUMMARY = os.environ.get("ZTBANK_LOAD_LOCUST_SUMMARY", "1") != "0"

ACCOUNTS = ("acc-alice-cny", "acc-alice-savings")
AMOUNT, CURRENCY = "0.01", "CNY"
TOKEN_REFRESH_AT = 0.8  # of the token's lifetime
REVOCATION_READY_SECONDS = 10.0
TELLER, VICTIM = "teller", "victim"

# Request names in the statistics (ids are folded into one name per endpoint).
TOKENS = "/v1/tokens"
ACCOUNT_LIST = "/v1/accounts"
TRANSACTIONS = "/v1/accounts/[id]/transactions"
TRANSFERS = "/v1/transfers"

# -- the gateway's identity -------------------------------------------------------------------


class GatewayIdentityError(ssl.SSLError):
    """The server is not the gateway, or its certificate is not a valid X509-SVID.

    An ``ssl.SSLError`` so that locust counts it as a failed request like any refused handshake.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not the gateway"


@dataclass
class Observations:
    """What the TLS layer saw: verified connections per kind of user, gateway certificates."""

    connections: Counter[str] = field(default_factory=Counter)
    # serial -> [first seen (epoch s), lifetime (s)]
    gateway_serials: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connected(self, who: str, certificate: x509.Certificate) -> None:
        serial = serial_hex(certificate)
        with self.lock:
            self.connections[who] += 1
            if serial not in self.gateway_serials:
                lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
                self.gateway_serials[serial] = [time.time(), lifetime.total_seconds()]


OBSERVED = Observations()


class GatewayVerifyingContext(_TlsContext):
    """A client context presenting one SVID that accepts only the gateway as the server, and
    only while the issuer's CRLs say its certificate is not revoked (fail closed)."""

    expected: SpiffeId
    bundle: list[x509.Certificate]
    revocation: RevocationWatcher
    who: str

    def wrap_socket(  # noqa: PLR0917 (ssl.SSLContext's own signature)
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        tls = super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )
        # Python's ssl exposes only the peer's leaf (before 3.13); the bundle holds the signing
        # CAs too, so the path can be rebuilt from it.
        der = tls.getpeercert(binary_form=True)
        try:
            found = verify_der_chain(
                [der] if der else [], self.bundle, trust_domain=self.expected.trust_domain
            )
        except CommonError as error:
            tls.close()
            raise GatewayIdentityError(f"not an acceptable X509-SVID: {error}") from None
        if found != self.expected:
            tls.close()
            raise GatewayIdentityError(f"expected {self.expected}, the server is {found}")
        assert der is not None
        certificate = x509.load_der_x509_certificate(der)
        try:
            self.revocation.check(certificate)
        except RevocationError as error:
            tls.close()
            raise GatewayIdentityError(f"the gateway's certificate: {error}") from None
        OBSERVED.connected(self.who, certificate)
        return tls


@cache
def _settings() -> StackSettings:
    return StackSettings()


@cache
def gateway_context(svid_dir: Path, who: str) -> GatewayVerifyingContext:
    """One context per SVID directory, shared by every user presenting that SVID."""
    files = {name: svid_dir / name for name in ("svid.pem", "svid.key", "bundle.pem")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RuntimeError(
            f"no SVID for the {who} load users ({', '.join(missing)} missing): mint one with"
            f" `ztbank svid mint --spiffe-id <teller id> --out {svid_dir} --ttl 10m`"
            " (make load does)"
        )
    context = GatewayVerifyingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # the gateway is identified by its SPIFFE ID instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_AEAD_CIPHERS)
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(files["svid.pem"], files["svid.key"])
    context.load_verify_locations(cafile=files["bundle.pem"])  # the trust domain's bundle only
    context.bundle = x509.load_pem_x509_certificates(files["bundle.pem"].read_bytes())
    context.expected = GATEWAY.spiffe_id(_settings().trust_domain)
    context.who = who
    context.revocation = _gateway_revocation(tuple(context.bundle))
    return context


@cache
def _gateway_revocation(bundle: tuple[x509.Certificate, ...]) -> RevocationWatcher:
    """The issuer's CRLs, polled in the background as the services poll them."""
    watcher = RevocationWatcher(crls_url(_settings().issuer_url), lambda: bundle)
    watcher.start()
    try:
        watcher.wait_ready(REVOCATION_READY_SECONDS)
    except RevocationError as error:
        raise RuntimeError(f"cannot check the gateway's revocation status: {error}") from None
    return watcher


def _gateway_url() -> str | None:
    try:
        address = FileRegistry(_settings().registry).lookup(GATEWAY.name)
    except CommonError:
        return None  # then locust asks for --host
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"https://{host}:{address.port}"


# -- failures by cause ------------------------------------------------------------------------


def failure_cause(error: BaseException) -> str:
    """A short, stable cause: ``HTTP 403``, ``connection reset``, ``TLS refused`` ..."""
    if isinstance(error, CatchResponseError):
        return str(error).split(":", 1)[0]  # the messages below start with their cause
    if isinstance(error, GatewayIdentityError):
        return "gateway identity"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError | BrokenPipeError | HTTPConnectionClosed):
        return "connection reset"
    if isinstance(error, ssl.SSLEOFError):
        return "connection reset"
    if isinstance(error, ssl.SSLError):
        return "TLS refused"
    if isinstance(error, TimeoutError):
        return "timeout"
    return "other"


def _detail(error: BaseException) -> str:
    reason = getattr(error, "reason", None)  # OpenSSL's short reason, e.g. CERTIFICATE_REVOKED
    if isinstance(error, ssl.SSLError) and reason:
        return f"{type(error).__name__} {reason}"
    return f"{type(error).__name__} {error}".strip()


def _problem_detail(body: bytes | None) -> str:
    try:
        document = json.loads(body or b"")
    except ValueError:
        return ""
    if not isinstance(document, dict):
        return ""
    return str(document.get("title") or document.get("detail") or "")


# (start to the tenth of a second, who, outcome) -> requests
TALLY: Counter[tuple[float, str, str]] = Counter()


def _tally(
    name: str, start_time: float, exception: BaseException | None, context: dict[str, Any], **_: Any
) -> None:
    if not OUTCOMES_FILE:
        return
    outcome = "ok" if exception is None else failure_cause(exception)
    TALLY[(math.floor(start_time * 10) / 10, str(context.get("who", TELLER)), outcome)] += 1


def _write_outcomes(environment: Environment, **_: Any) -> None:
    if not OUTCOMES_FILE:
        return
    document = {
        "outcomes": [
            {"start": start, "who": who, "outcome": outcome, "count": count}
            for (start, who, outcome), count in sorted(TALLY.items())
        ],
        "connections": dict(OBSERVED.connections),
        "gateway_serials": [
            {"serial": serial, "first_seen": seen, "lifetime_seconds": lifetime}
            for serial, (seen, lifetime) in OBSERVED.gateway_serials.items()
        ],
    }
    Path(OUTCOMES_FILE).write_text(json.dumps(document, indent=1) + "\n")


def _quiet_summary(environment: Environment, **_: Any) -> None:
    """``ZTBANK_LOAD_LOCUST_SUMMARY=0``: no summary tables of locust's own on stdout
    (``loadtest/report.py`` prints a compact one from the CSV files)."""
    if not LOCUST_SUMMARY:
        logging.getLogger("locust.stats_logger").setLevel(logging.WARNING)
    _ENVIRONMENT.append(environment)


def _final_csv(**_: Any) -> None:
    """Locust rewrites its ``--csv`` files every CSV_STATS_INTERVAL_SEC, not at the end: once
    the users have stopped (this event), give its writer one more turn so that the files hold
    the final numbers, including the last second and the requests finished during
    ``--stop-timeout``."""
    options = _ENVIRONMENT[0].parsed_options if _ENVIRONMENT else None
    if options is not None and getattr(options, "csv_prefix", None):
        time.sleep(CSV_STATS_INTERVAL_SEC + 0.2)  # monkey-patched by locust: yields to gevent


_ENVIRONMENT: list[Environment] = []

# locust's EventHook.add_listener is unannotated.
events.init.add_listener(_quiet_summary)  # type: ignore[no-untyped-call]
events.request.add_listener(_tally)  # type: ignore[no-untyped-call]
events.quitting.add_listener(_write_outcomes)  # type: ignore[no-untyped-call]
events.quit.add_listener(_final_csv)  # type: ignore[no-untyped-call]


# -- users ------------------------------------------------------------------------------------


class TellerUser(FastHttpUser):
    """The teller acting for one customer; subclasses pick the mix of tasks."""

    abstract = True
    host = _gateway_url()
    wait_time = between(0.1, 0.5)
    connection_timeout = 5.0
    network_timeout = 10.0
    # Only turns off host-name checks (the gateway is checked by SPIFFE ID, see the context):
    # with our own ssl_context_factory the chain is still verified against bundle.pem.
    insecure = True

    who = TELLER
    svid_dir = SVID_DIR
    reconnect_seconds = RECONNECT_SECONDS  # 0: keep connections alive
    label = ""

    def __init__(self, environment: Environment) -> None:
        context = gateway_context(self.svid_dir.absolute(), self.who)
        # geventhttpclient calls this with cafile=<certifi>: ignored, only our bundle is trusted.
        self.ssl_context_factory: Callable[..., ssl.SSLContext] = lambda **_: context
        super().__init__(environment)
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._connected_at = time.monotonic()
        self._accounts: list[str] = list(ACCOUNTS)
        self._turn = 0

    def context(self) -> dict[str, Any]:
        return {"who": self.who}

    def on_start(self) -> None:
        self._renew_token()

    # -- plumbing ------------------------------------------------------------------------------

    def _connection_headers(self) -> dict[str, str]:
        if self.reconnect_seconds < 0:
            return {"Connection": "close"}
        now = time.monotonic()
        if self.reconnect_seconds and now - self._connected_at >= self.reconnect_seconds:
            self._connected_at = now
            return {"Connection": "close"}
        return {}

    def _call(
        self,
        method: str,
        path: str,
        name: str,
        *,
        body: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        """One request; the parsed JSON answer, or None after recording why it failed."""
        all_headers = {"Accept": "application/json", **(headers or {})}
        all_headers.update(self._connection_headers())
        with self.client.request(
            method,
            path,
            name=f"{self.label}{name}",
            json=body,
            headers=all_headers,
            catch_response=True,
        ) as response:
            error = getattr(response, "error", None)
            status = response.status_code or 0
            if status == 0 and isinstance(error, BaseException):
                response.failure(f"{failure_cause(error)}: {_detail(error)}")
                return None
            if status not in ok:
                response.failure(f"HTTP {status}: {_problem_detail(response.content)}")
                if status == 401:
                    self._token = None  # expired or refused: obtain a new one next time
                return None
            try:
                answer = response.json()
            except ValueError:
                response.failure(f"bad answer: HTTP {status} without a JSON body")
                return None
            response.success()
            return answer

    def _renew_token(self) -> None:
        answer = self._call("POST", "/v1/tokens", TOKENS, body={"customer": CUSTOMER}, ok=(201,))
        if isinstance(answer, dict) and "access_token" in answer:
            self._token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 600))
            self._token_renew_at = time.monotonic() + TOKEN_REFRESH_AT * lifetime

    def _authorization(self) -> dict[str, str] | None:
        if self._token is None or time.monotonic() >= self._token_renew_at:
            self._renew_token()
        return None if self._token is None else {"Authorization": f"Bearer {self._token}"}

    # -- requests (the profiles below weigh them as tasks) ---------------------------------------

    def list_accounts(self) -> None:
        if (headers := self._authorization()) is None:
            return
        answer = self._call("GET", "/v1/accounts", ACCOUNT_LIST, headers=headers)
        if isinstance(answer, dict) and answer.get("accounts"):
            self._accounts = [str(account["id"]) for account in answer["accounts"]]

    def list_transactions(self) -> None:
        if (headers := self._authorization()) is None:
            return
        account = self._accounts[self._turn % len(self._accounts)]
        self._turn += 1
        self._call("GET", f"/v1/accounts/{account}/transactions", TRANSACTIONS, headers=headers)

    def transfer(self) -> None:
        if (headers := self._authorization()) is None:
            return
        source, target = ACCOUNTS if self._turn % 2 == 0 else reversed(ACCOUNTS)
        self._turn += 1
        body = {
            "from_account": source,
            "to_account": target,
            "amount": AMOUNT,
            "currency": CURRENCY,
        }
        # Posted (201) or held for review (202) are both successes; rejected (422) is not.
        headers["Idempotency-Key"] = str(uuid.uuid4())
        self._call("POST", "/v1/transfers", TRANSFERS, body=body, headers=headers, ok=(201, 202))


class ReadsUser(TellerUser):
    """Account reads only, 1 : 1."""

    @tag("reads")
    @task
    def accounts(self) -> None:
        self.list_accounts()

    @tag("reads")
    @task
    def transactions(self) -> None:
        self.list_transactions()


class TransfersUser(TellerUser):
    """Transfers only."""

    @tag("transfers")
    @task
    def transfers(self) -> None:
        self.transfer()


class MixedUser(TellerUser):
    """3 reads : 1 transfer."""

    @tag("reads")
    @task(2)
    def accounts(self) -> None:
        self.list_accounts()

    @tag("reads")
    @task(1)
    def transactions(self) -> None:
        self.list_transactions()

    @tag("transfers")
    @task(1)
    def transfers(self) -> None:
        self.transfer()


class VictimUser(MixedUser):
    """Chaos: one mixed user with its own SVID, revoked mid-run; a new connection per request."""

    fixed_count = 1
    who = VICTIM
    svid_dir = VICTIM_SVID_DIR
    reconnect_seconds = -1
    label = "[victim] "
