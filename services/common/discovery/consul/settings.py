"""Where Consul is and how ztbank uses it, from the environment; builds the client and watcher.

Configured by Consul's own variables: ``CONSUL_HTTP_ADDR`` (``host:port`` or a URL),
``CONSUL_HTTP_TOKEN`` (sent as ``X-Consul-Token``), ``CONSUL_CACERT`` (CA bundle for an
https address) and ``CONSUL_HTTP_SSL``.  TLS verification is never disabled:
``CONSUL_HTTP_SSL_VERIFY=false`` is refused.  ztbank's own knobs:

- ``ZTBANK_CONSUL_POLICY_KEY``: default ``ztbank/policy``, the same JSON as infra/policy.json;
- ``ZTBANK_CONSUL_POLICY_MAX_STALENESS_SECONDS`` (default 60) and
  ``ZTBANK_CONSUL_WATCH_WAIT_SECONDS`` (default 20, the blocking query's ``wait``);
- ``ZTBANK_CONSUL_ADVERTISE_HOST``: the host registered for this service.
"""

from __future__ import annotations

import socket

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.discovery.consul.client import ConsulClient, base_url
from services.common.discovery.consul.policy_source import (
    DEFAULT_MAX_STALENESS,
    DEFAULT_POLICY_KEY,
    DEFAULT_WATCH_WAIT,
    ConsulPolicySource,
    check_watch_timing,
)

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (compared, not bound)


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
        check_watch_timing(self.watch_wait_seconds, self.policy_max_staleness_seconds)
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
