"""Service discovery of the native stack: a JSON file of addresses (``infra/registry.json``).

The compose stack finds the same services through Consul; both sit behind ``ServiceRegistry``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import CommonError


class RegistryError(CommonError):
    """The registry is unreadable or does not know a service."""


@dataclass(frozen=True)
class ServiceAddress:
    name: str
    host: str
    port: int
    metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class ServiceRegistry(Protocol):
    def lookup(self, name: str) -> ServiceAddress: ...


class FileRegistry:
    """Re-reads the file on every lookup: lookups happen when channels are built, not per call."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def services(self) -> dict[str, ServiceAddress]:
        try:
            document = json.loads(self._path.read_text())
            return {
                name: ServiceAddress(
                    name=name,
                    host=str(entry["host"]),
                    port=int(entry["port"]),
                    metrics_port=(
                        int(entry["metrics_port"])
                        if entry.get("metrics_port") is not None
                        else None
                    ),
                )
                for name, entry in document["services"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise RegistryError(f"cannot read the service registry {self._path}: {error}") from None

    def lookup(self, name: str) -> ServiceAddress:
        address = self.services().get(name)
        if address is None:
            raise RegistryError(f"service {name!r} is not in the registry {self._path}")
        return address


def write_registry(path: Path, addresses: list[ServiceAddress]) -> None:
    document = {
        "services": {
            a.name: {"host": a.host, "port": a.port}
            | ({"metrics_port": a.metrics_port} if a.metrics_port is not None else {})
            for a in addresses
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
