"""Consul for the compose stack: registration with health checks, discovery of passing
instances, and the authorization policy in KV, watched with blocking queries.

Configured by Consul's own variables: ``CONSUL_HTTP_ADDR`` (``host:port`` or a URL),
``CONSUL_HTTP_TOKEN`` (sent as ``X-Consul-Token``), ``CONSUL_CACERT`` (CA bundle for an
https address) and ``CONSUL_HTTP_SSL``.  TLS verification is never disabled:
``CONSUL_HTTP_SSL_VERIFY=false`` is refused.  ztbank's own knobs:

- ``ZTBANK_CONSUL_POLICY_KEY``: default ``ztbank/policy``, the same JSON as infra/policy.json;
- ``ZTBANK_CONSUL_POLICY_MAX_STALENESS_SECONDS`` (default 60) and
  ``ZTBANK_CONSUL_WATCH_WAIT_SECONDS`` (default 20, the blocking query's ``wait``);
- ``ZTBANK_CONSUL_ADVERTISE_HOST``: the host registered for this service.

Staleness: the watcher keeps the last policy Consul confirmed.  While Consul cannot be reached
(or answers with an error) that policy keeps deciding until ``max_staleness`` seconds have passed
since Consul last answered, then every request is denied until Consul answers again (fail
closed).  A key that Consul says is absent, or a document that does not parse, denies everything at
once, like a deleted or broken policy file.
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.authz.policy import PolicyError
from services.common.discovery.registry import RegistryError, ServiceAddress
from services.common.errors import CommonError

logger = logging.getLogger(__name__)

DEFAULT_POLICY_KEY = "ztbank/policy"
DEFAULT_TIMEOUT = 10.0
DEFAULT_WATCH_WAIT = 20.0
DEFAULT_MAX_STALENESS = 60.0
# Consul adds up to wait/16 of jitter to a blocking query before it answers.
WAIT_JITTER = 1 / 16
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (compared, not bound)


class ConsulError(CommonError):
    """Consul is unreachable, refused a request, or answered something unexpected."""


class ConsulAuthError(ConsulError):
    """Consul refused the ACL token (HTTP 401/403)."""


# -- configuration ---------------------------------------------------------------------------


class ConsulSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    http_addr: str = Field(default="", validation_alias="CONSUL_HTTP_ADDR")
    http_token: SecretStr = Field(default=SecretStr(""), validation_alias="CONSUL_HTTP_TOKEN")
    cacert: str = Field(default="", validation_alias="CONSUL_CACERT")
    http_ssl: bool = Field(default=False, validation_alias="CONSUL_HTTP_SSL")
    http_ssl_verify: bool = Field(default=True, validation_alias="CONSUL_HTTP_SSL_VERIFY")
    policy_key: str = Field(default=DEFAULT_POLICY_KEY, validation_alias="ZTBANK_CONSUL_POLICY_KEY")
    policy_max_staleness_seconds: float = Field(
        default=DEFAULT_MAX_STALENESS,
        gt=0,
        validation_alias="ZTBANK_CONSUL_POLICY_MAX_STALENESS_SECONDS",
    )
    watch_wait_seconds: float = Field(
        default=DEFAULT_WATCH_WAIT, gt=0, validation_alias="ZTBANK_CONSUL_WATCH_WAIT_SECONDS"
    )
    # The address other services reach this one at; the listen host when that is not a wildcard,
    # else this machine's host name (the container name in compose).
    advertise_host: str = Field(default="", validation_alias="ZTBANK_CONSUL_ADVERTISE_HOST")

    @model_validator(mode="after")
    def _consistent(self) -> ConsulSettings:
        if not self.http_ssl_verify:
            raise ValueError(
                "CONSUL_HTTP_SSL_VERIFY=false is refused: ztbank never disables TLS "
                "verification; give the CA in CONSUL_CACERT"
            )
        if self.http_addr:
            base_url(self.http_addr, ssl=self.http_ssl)  # raises ValueError when malformed
        _check_timing(self.watch_wait_seconds, self.policy_max_staleness_seconds)
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.http_addr)

    def client(self) -> ConsulClient:
        return ConsulClient(
            self.http_addr,
            token=self.http_token.get_secret_value(),
            ca_cert=self.cacert or None,
            ssl=self.http_ssl,
        )

    def policy_source(self) -> ConsulPolicySource:
        """Not started: call ``start()``.  Gets its own client (its own HTTP session)."""
        return ConsulPolicySource(
            self.client(),
            self.policy_key,
            max_staleness=self.policy_max_staleness_seconds,
            wait=self.watch_wait_seconds,
        )

    def advertised(self, listen_host: str) -> str:
        if self.advertise_host:
            return self.advertise_host
        return socket.gethostname() if listen_host in WILDCARD_HOSTS else listen_host


def _check_timing(wait: float, max_staleness: float) -> None:
    # A healthy Consul confirms the policy at least every wait * (1 + 1/16): staleness must
    # leave room for that, or a quiet but healthy watch would fail closed.
    if max_staleness < 2 * wait:
        raise ValueError(
            f"policy max staleness {max_staleness:g}s must be at least twice the blocking "
            f"query wait {wait:g}s"
        )


def base_url(address: str, *, ssl: bool = False) -> str:
    """``CONSUL_HTTP_ADDR`` (``host:port``, ``http://...`` or ``https://...``) -> base URL."""
    address = address.strip()
    if "://" in address:
        scheme, _, rest = address.partition("://")
        if scheme not in ("http", "https") or not rest.strip("/"):
            raise ValueError(f"CONSUL_HTTP_ADDR {address!r}: only http(s)://host:port is supported")
        return address.rstrip("/")
    address = address.rstrip("/")
    if not address:
        raise ValueError("CONSUL_HTTP_ADDR is empty")
    return f"{'https' if ssl else 'http'}://{address}"


# -- the HTTP client -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsulCheck:
    """One agent check: exactly one of ``tcp`` (``host:port``) or ``http`` (a URL)."""

    tcp: str | None = None
    http: str | None = None
    interval: str = "5s"
    timeout: str = "2s"
    deregister_critical_after: str = "1m"

    def __post_init__(self) -> None:
        if (self.tcp is None) == (self.http is None):
            raise ValueError("a Consul check needs exactly one of tcp or http")
        if self.http is not None and not self.http.startswith(("http://", "https://")):
            raise ValueError(f"an HTTP check needs an http(s) URL, not {self.http!r}")

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Interval": self.interval,
            "Timeout": self.timeout,
            "DeregisterCriticalServiceAfter": self.deregister_critical_after,
        }
        if self.tcp is not None:
            body["TCP"] = self.tcp
        else:
            body |= {"HTTP": self.http, "Method": "GET", "TLSSkipVerify": False}
        return body


@dataclass(frozen=True)
class KvEntry:
    """A KV read: ``value`` is None when the key does not exist; ``index`` is X-Consul-Index."""

    value: str | None
    index: int
    modify_index: int | None = None


class ConsulClient:
    """A small typed client over Consul's HTTP API; every call raises ``ConsulError``."""

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        ca_cert: str | None = None,
        ssl: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
    ) -> None:
        try:
            self.base_url = base_url(address, ssl=ssl)
        except ValueError as error:
            raise ConsulError(str(error)) from None
        self._token = token
        # A CA bundle path or True: never False.
        self._verify: str | bool = ca_cert or True
        self._timeout = timeout
        self._session = session or requests.Session()

    def close(self) -> None:
        self._session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        data: bytes | None = None,
        timeout: float | None = None,
    ) -> requests.Response:
        """One call; 401/403 -> ConsulAuthError, any other non-2xx but 404 -> ConsulError."""
        headers = {"X-Consul-Token": self._token} if self._token else {}
        what = f"{method} {path}"
        try:
            response = self._session.request(
                method,
                f"{self.base_url}{path}",
                params=params,
                json=body,
                data=data,
                headers=headers,
                verify=self._verify,
                timeout=timeout or self._timeout,
            )
        except requests.RequestException as error:
            raise ConsulError(f"Consul at {self.base_url} unreachable ({what}): {error}") from None
        if response.status_code in (401, 403):
            token = "the ACL token in CONSUL_HTTP_TOKEN" if self._token else "no ACL token"
            raise ConsulAuthError(
                f"Consul at {self.base_url} refused {token} for {what} "
                f"(HTTP {response.status_code}: {_snippet(response)}); "
                "check CONSUL_HTTP_TOKEN and its ACL policy"
            )
        if response.status_code != 404 and not response.ok:
            raise ConsulError(
                f"Consul at {self.base_url} answered HTTP {response.status_code} to {what}: "
                f"{_snippet(response)}"
            )
        return response

    def _expect_found(self, response: requests.Response, what: str) -> None:
        if response.status_code == 404:
            raise ConsulError(f"Consul at {self.base_url} answered HTTP 404 to {what}")

    # -- agent -------------------------------------------------------------------------------

    def register_service(
        self,
        name: str,
        address: str,
        port: int,
        check: ConsulCheck,
        *,
        service_id: str | None = None,
        meta: Mapping[str, str] | None = None,
    ) -> str:
        """Register with the local agent; the service's ID (``name-address-port`` by default)."""
        service_id = service_id or f"{name}-{address}-{port}"
        body = {
            "ID": service_id,
            "Name": name,
            "Address": address,
            "Port": port,
            "Tags": ["ztbank"],
            "Meta": dict(meta or {}),
            "Check": check.payload(),
        }
        path = "/v1/agent/service/register"
        self._expect_found(self.request("PUT", path, body=body), f"PUT {path}")
        logger.info("registered %s as %s at %s:%d in Consul", name, service_id, address, port)
        return service_id

    def deregister_service(self, service_id: str) -> None:
        path = f"/v1/agent/service/deregister/{quote(service_id, safe='')}"
        self._expect_found(self.request("PUT", path), f"PUT {path}")

    # -- health ------------------------------------------------------------------------------

    def passing_instances(self, name: str) -> list[ServiceAddress]:
        """Instances of ``name`` whose every check passes, in Consul's order."""
        path = f"/v1/health/service/{quote(name, safe='')}"
        response = self.request("GET", path, params={"passing": "true"})
        self._expect_found(response, f"GET {path}")
        try:
            entries = response.json()
            found = []
            for entry in entries:
                checks = entry.get("Checks") or []
                # ?passing=true already filters; checked again so nothing else ever slips in.
                if any(check["Status"] != "passing" for check in checks):
                    continue
                service = entry["Service"]
                meta = service.get("Meta") or {}
                metrics = meta.get("metrics_port")
                found.append(
                    ServiceAddress(
                        name=name,
                        host=str(service.get("Address") or entry["Node"]["Address"]),
                        port=int(service["Port"]),
                        metrics_port=int(metrics) if metrics else None,
                    )
                )
            return found
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ConsulError(
                f"unexpected answer from Consul at {self.base_url} to GET {path}: {error!r}"
            ) from None

    # -- KV ----------------------------------------------------------------------------------

    def kv_get(self, key: str, *, index: int = 0, wait: float | None = None) -> KvEntry:
        """Read ``key``; with ``index`` > 0 a blocking query that returns once the key's index
        passes it or ``wait`` seconds (plus Consul's jitter) have gone by."""
        path = f"/v1/kv/{quote(key, safe='/')}"
        params = {}
        timeout = None
        if index > 0:
            params["index"] = str(index)
            if wait is not None:
                params["wait"] = f"{round(wait * 1000)}ms"
                timeout = wait * (1 + WAIT_JITTER) + self._timeout
        response = self.request("GET", path, params=params, timeout=timeout)
        try:
            consul_index = int(response.headers["X-Consul-Index"])
            if response.status_code == 404:
                return KvEntry(None, consul_index)
            entries = response.json()
            entry = next(e for e in entries if e["Key"] == key)
            raw = entry.get("Value")
            value = base64.b64decode(raw, validate=True).decode() if raw else ""
            return KvEntry(value, consul_index, int(entry["ModifyIndex"]))
        except (KeyError, ValueError, TypeError, StopIteration, binascii.Error) as error:
            raise ConsulError(
                f"unexpected answer from Consul at {self.base_url} to GET {path}: {error!r}"
            ) from None

    def kv_put(self, key: str, value: str) -> None:
        """Write ``key`` (the compose stack's operators and the live tests publish policies so)."""
        path = f"/v1/kv/{quote(key, safe='/')}"
        response = self.request("PUT", path, data=value.encode())
        self._expect_found(response, f"PUT {path}")
        if response.text.strip() != "true":
            raise ConsulError(
                f"Consul at {self.base_url} did not store {key}: {_snippet(response)}"
            )

    def kv_delete(self, key: str) -> None:
        path = f"/v1/kv/{quote(key, safe='/')}"
        self._expect_found(self.request("DELETE", path), f"DELETE {path}")


def _snippet(response: requests.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:200] or response.reason or "no body"


# -- discovery -------------------------------------------------------------------------------


class ConsulRegistry:
    """``ServiceRegistry`` over Consul's health API: the first instance whose checks pass."""

    def __init__(self, client: ConsulClient) -> None:
        self._client = client

    def lookup(self, name: str) -> ServiceAddress:
        try:
            instances = self._client.passing_instances(name)
        except ConsulError as error:
            raise RegistryError(f"cannot look up {name!r} in Consul: {error}") from None
        if not instances:
            raise RegistryError(
                f"no passing instance of {name} in Consul at {self._client.base_url}"
            )
        return instances[0]


@dataclass
class ConsulRegistration:
    """This process's entry in Consul; ``close`` deregisters it."""

    client: ConsulClient
    service_id: str
    closed: bool = field(default=False)

    @classmethod
    def register(
        cls, client: ConsulClient, address: ServiceAddress, advertised_host: str
    ) -> ConsulRegistration:
        """A TCP check on the service port: a TLS handshake there needs a client SVID, which
        Consul does not have, so an HTTP(S) check could never pass."""
        meta = {"metrics_port": str(address.metrics_port)} if address.metrics_port else {}
        service_id = client.register_service(
            address.name,
            advertised_host,
            address.port,
            ConsulCheck(tcp=f"{advertised_host}:{address.port}"),
            meta=meta,
        )
        return cls(client, service_id)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.client.deregister_service(self.service_id)
        except ConsulError as error:
            # DeregisterCriticalServiceAfter removes it once its check has failed long enough.
            logger.warning("could not deregister %s from Consul: %s", self.service_id, error)


# -- the policy ------------------------------------------------------------------------------


class ConsulPolicySource:
    """``PolicySource`` over a Consul KV key, kept current by a daemon thread of blocking queries.

    ``stamp()`` and ``read()`` never touch the network: they answer from what the watcher last
    heard, and raise ``PolicyError`` (deny everything) when there is no policy or Consul has not
    confirmed it for more than ``max_staleness`` seconds.
    """

    def __init__(
        self,
        client: ConsulClient,
        key: str = DEFAULT_POLICY_KEY,
        *,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        wait: float = DEFAULT_WATCH_WAIT,
        retry: float = 1.0,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_timing(wait, max_staleness)
        self._client = client
        self.key = key
        self.max_staleness = max_staleness
        self.wait = wait
        self._retry = retry
        self._max_retry = max(retry, min(15.0, max_staleness / 4))
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._text: str | None = None
        self._modify_index: int | None = None
        self._confirmed_at: float | None = None
        self._error: str | None = "not fetched from Consul yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        return f"Consul KV {self.key} at {self._client.base_url}"

    # -- PolicySource ------------------------------------------------------------------------

    def stamp(self) -> object:
        with self._lock:
            self._usable()
            return self._modify_index

    def read(self) -> str:
        with self._lock:
            return self._usable()

    def _usable(self) -> str:
        if self._text is None or self._confirmed_at is None:
            raise PolicyError(self._error or f"no policy at {self.describe()}")
        age = self._clock() - self._confirmed_at
        if age > self.max_staleness:
            raise PolicyError(
                f"policy from {self.describe()} is stale: last confirmed {age:.0f}s ago, "
                f"more than the {self.max_staleness:g}s allowed ({self._error})"
            )
        return self._text

    # -- watching ----------------------------------------------------------------------------

    @property
    def index(self) -> int:
        return self._index

    @property
    def last_error(self) -> str | None:
        return self._error

    def poll(self, *, block: bool = True) -> bool:
        """One (blocking, once an index is known) query; records the outcome, never raises."""
        index = self._index if block else 0
        try:
            entry = self._client.kv_get(self.key, index=index, wait=self.wait)
        except ConsulError as error:
            with self._lock:
                if self._error != str(error):
                    logger.error("policy watch of %s failed: %s", self.describe(), error)
                self._error = str(error)
            return False
        with self._lock:
            # Consul's rules for blocking indexes: reset when it goes backwards, never below 1.
            self._index = 0 if entry.index < self._index else max(entry.index, 1)
            self._confirmed_at = self._clock()
            if entry.value is None:
                if self._text is not None or self._error is None:
                    logger.error("no policy at %s: denying everything", self.describe())
                self._text, self._modify_index = None, None
                self._error = f"no policy at {self.describe()}"
            else:
                if entry.modify_index != self._modify_index:
                    logger.info("policy %s at index %s", self.describe(), entry.modify_index)
                self._text, self._modify_index, self._error = (
                    entry.value,
                    entry.modify_index,
                    None,
                )
        return True

    def start(self) -> ConsulPolicySource:
        """Fetch once now (without blocking), then watch in a daemon thread."""
        self.poll(block=False)
        self._thread = threading.Thread(target=self._run, name="consul-policy", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        delay = self._retry
        while not self._stop.is_set():
            if self.poll():
                delay = self._retry
                self._stop.wait(self._min_interval)
            else:
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_retry)

    def close(self, timeout: float = 1.0) -> None:
        """Stops the watch; a blocking query in flight ends on its own (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
