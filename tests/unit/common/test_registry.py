"""The file service registry of the native stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.discovery.registry import (
    FileRegistry,
    RegistryError,
    ServiceAddress,
    write_registry,
)

ADDRESSES = [
    ServiceAddress("gateway", "127.0.0.1", 8443, 9464),
    ServiceAddress("transfer-engine", "127.0.0.1", 7001, 9465),
    ServiceAddress("risk", "::1", 7002, 9466),
]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "registry.json"
    write_registry(path, ADDRESSES)
    registry = FileRegistry(path)
    assert registry.services() == {a.name: a for a in ADDRESSES}
    assert registry.lookup("transfer-engine") == ADDRESSES[1]
    assert registry.lookup("gateway").target == "127.0.0.1:8443"


def test_round_trip_without_metrics_port(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    address = ServiceAddress("risk", "127.0.0.1", 7002)
    write_registry(path, [address])
    assert FileRegistry(path).lookup("risk") == address


def test_metrics_port_is_optional_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"services": {"risk": {"host": "10.0.0.7", "port": "7002"}}}))
    assert FileRegistry(path).lookup("risk") == ServiceAddress("risk", "10.0.0.7", 7002, None)


def test_edits_are_seen_by_the_next_lookup(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    write_registry(path, ADDRESSES)
    registry = FileRegistry(path)
    write_registry(path, [ServiceAddress("gateway", "127.0.0.1", 9443, 9464)])
    assert registry.lookup("gateway").port == 9443
    with pytest.raises(RegistryError):
        registry.lookup("risk")


def test_unknown_service(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    write_registry(path, ADDRESSES)
    with pytest.raises(RegistryError, match="'ledger' is not in the registry") as caught:
        FileRegistry(path).lookup("ledger")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"servers": {}}',
        '{"services": {"risk": {"host": "127.0.0.1"}}}',
        '{"services": {"risk": {"host": "127.0.0.1", "port": "seven"}}}',
        '{"services": {"risk": null}}',
        '{"services": ["risk"]}',
        '{"services": null}',
    ],
)
def test_broken_file_names_its_path(tmp_path: Path, text: str) -> None:
    path = tmp_path / "registry.json"
    path.write_text(text)
    with pytest.raises(RegistryError, match="cannot read the service registry") as caught:
        FileRegistry(path).lookup("risk")
    assert str(path) in str(caught.value)


def test_missing_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(RegistryError) as caught:
        FileRegistry(path).services()
    assert str(path) in str(caught.value)
