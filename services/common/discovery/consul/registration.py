"""A service of the compose stack entering Consul at start, with the health check that decides
whether peers may find it, and leaving it at shutdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.common.discovery.consul.client import ConsulCheck, ConsulClient, ConsulError
from services.common.discovery.registry import ServiceAddress

logger = logging.getLogger(__name__)


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
