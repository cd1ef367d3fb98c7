"""Vault's TLS material, its configuration and the native stack's choice of upstream, without a
Vault server (tests/integration/test_vault_live.py runs a real one)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.stack.native import NativeStack, StackError, StackSettings
from services.stack.sandbox import REPO_ROOT
from services.stack.vault import VaultHealth, VaultServer, vault_config
from services.stack.vault_tls import (
    RENEW_WHEN_LEFT,
    SERVER_TTL,
    VaultTls,
    VaultTlsError,
    ensure_vault_tls,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _tls(tmp_path: Path) -> VaultTls:
    return VaultTls(tmp_path / "tls", tmp_path / "ca")


def _served(tls: VaultTls) -> x509.Certificate:
    return x509.load_pem_x509_certificate(tls.server_cert.read_bytes())


def test_the_first_call_makes_a_ca_and_a_server_certificate_it_signed(tmp_path: Path) -> None:
    tls = _tls(tmp_path)

    made = ensure_vault_tls(tls, dns_names=["vault"], ip_addresses=["127.0.0.1"], now=NOW)

    assert len(made) == 2
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    served = _served(tls)
    served.verify_directly_issued_by(ca)
    sans = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["vault"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert served.not_valid_after_utc == NOW + SERVER_TTL
    assert not served.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private in (tls.server_key, tls.ca_dir / "ca.key"):
        assert private.stat().st_mode & 0o777 == 0o600
    # Vault's readers get the CA certificate; its key stays in the CA's own directory.
    assert not (tls.directory / "ca.key").exists()


def test_a_current_certificate_is_kept_and_one_near_its_end_is_renewed(tmp_path: Path) -> None:
    tls = _tls(tmp_path)
    ensure_vault_tls(tls, ip_addresses=["127.0.0.1"], now=NOW)
    first = _served(tls)

    kept = ensure_vault_tls(tls, ip_addresses=["127.0.0.1"], now=NOW + timedelta(days=19))
    due = NOW + SERVER_TTL - RENEW_WHEN_LEFT + timedelta(minutes=1)
    renewed = ensure_vault_tls(tls, ip_addresses=["127.0.0.1"], now=due)

    assert kept == []
    assert len(renewed) == 1
    assert renewed[0].startswith("server certificate")
    assert _served(tls).serial_number != first.serial_number


def test_other_names_or_a_foreign_certificate_get_a_new_one(tmp_path: Path) -> None:
    tls = _tls(tmp_path)
    ensure_vault_tls(tls, ip_addresses=["127.0.0.1"], now=NOW)
    other = _tls(tmp_path / "other")
    ensure_vault_tls(other, ip_addresses=["127.0.0.1"], now=NOW)

    assert ensure_vault_tls(tls, dns_names=["vault"], ip_addresses=["127.0.0.1"], now=NOW)
    tls.server_cert.write_bytes(other.server_cert.read_bytes())
    tls.server_key.write_bytes(other.server_key.read_bytes())
    assert ensure_vault_tls(tls, dns_names=["vault"], ip_addresses=["127.0.0.1"], now=NOW)
    _served(tls).verify_directly_issued_by(x509.load_pem_x509_certificate(tls.ca_cert.read_bytes()))


def test_bad_names_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(VaultTlsError, match=r"'vault\.local' is not an IP address"):
        ensure_vault_tls(_tls(tmp_path), ip_addresses=["vault.local"])
    with pytest.raises(VaultTlsError, match="at least one DNS name or IP address"):
        ensure_vault_tls(_tls(tmp_path))


def test_the_configuration_listens_on_loopback_tls_with_raft_and_a_file_audit(
    tmp_path: Path,
) -> None:
    tls = _tls(tmp_path)
    text = vault_config(
        data_dir=tmp_path / "data",
        tls=tls,
        port=18200,
        cluster_port=18201,
        audit_file=tmp_path / "audit.log",
    )

    assert 'address         = "127.0.0.1:18200"' in text
    assert f'tls_cert_file   = "{tls.server_cert}"' in text
    assert 'tls_min_version = "tls12"' in text
    assert "tls_disable" not in text
    assert 'storage "raft"' in text
    assert f'file_path = "{tmp_path / "audit.log"}"' in text
    assert 'cluster_addr  = "https://127.0.0.1:18201"' in text


@pytest.mark.parametrize(
    ("health", "state"),
    [
        (VaultHealth(True, initialized=True, sealed=False), "active"),
        (VaultHealth(True, initialized=True, sealed=True), "sealed"),
        (VaultHealth(True, initialized=False), "not initialised"),
        (VaultHealth(False, error="connection refused"), "unreachable: connection refused"),
    ],
)
def test_vaults_health_reads_as_one_word_or_the_reason(health: VaultHealth, state: str) -> None:
    assert health.state == state


def test_an_unreachable_vault_says_why(tmp_path: Path) -> None:
    server = VaultServer(tmp_path, port=1, trust_domain="ztbank.example")
    ensure_vault_tls(server.tls, ip_addresses=["127.0.0.1"])

    health = server.health()

    assert not health.reachable
    assert "refused" in health.error


def _stack(tmp_path: Path, **settings: Any) -> NativeStack:
    return NativeStack(
        StackSettings(
            home=tmp_path / "var", registry=REPO_ROOT / "infra" / "registry.json", **settings
        )
    )


def test_the_upstream_is_the_recorded_one_unless_another_is_asked_for(tmp_path: Path) -> None:
    assert _stack(tmp_path).upstream() == "disk"
    assert _stack(tmp_path, upstream="vault").upstream() == "vault"
    record = tmp_path / "var" / "upstream.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"upstream": "vault", "vault_port": 18300}))

    recorded = _stack(tmp_path)
    assert recorded.upstream() == "vault"
    assert recorded.vault.address == "https://127.0.0.1:18300"
    assert _stack(tmp_path, vault_port=18400).vault.address == "https://127.0.0.1:18400"
    with pytest.raises(StackError, match=r"set up with the vault upstream.*make reset"):
        _stack(tmp_path, upstream="disk").upstream()


def test_a_stack_from_before_the_record_is_a_disk_stack_and_a_garbled_record_is_named(
    tmp_path: Path,
) -> None:
    state = tmp_path / "var" / "issuer" / "authority.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    assert _stack(tmp_path).recorded_upstream() == "disk"
    with pytest.raises(StackError, match="set up with the disk upstream"):
        _stack(tmp_path, upstream="vault").upstream()

    (tmp_path / "var" / "upstream.json").write_text("{not json")
    with pytest.raises(StackError, match=r"upstream.json is unreadable.*make reset"):
        _stack(tmp_path).upstream()
    assert _stack(tmp_path).down() == []  # down needs no readable record
