"""Consul's HTTP API as ztbank uses it (agent registration, passing instances, KV), typed, with
one error type for every way a call can fail and messages that say what to check.

Kept apart from what is built on it (lookups, registration, the policy watcher) so that each of
those is tested against this boundary alone.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from services.common.discovery.registry import ServiceAddress
from services.common.errors import CommonError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
# Consul adds up to wait/16 of jitter to a blocking query before it answers.
WAIT_JITTER = 1 / 16


class ConsulError(CommonError):
    """Consul is unreachable, refused a request, or answered something unexpected."""


class ConsulAuthError(ConsulError):
    """Consul refused the ACL token (HTTP 401/403)."""


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
