"""``ServiceRegistry`` over Consul: how a service of the compose stack finds a peer, among the
instances whose health checks all pass (never one Consul considers failing)."""

from __future__ import annotations

from services.common.discovery.consul.client import ConsulClient, ConsulError
from services.common.discovery.registry import RegistryError, ServiceAddress


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
