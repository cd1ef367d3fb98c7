"""``create_runtime`` wires one CRL watcher per service and does not start without fresh CRLs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.common.discovery.registry import ServiceAddress, write_registry
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.revocation import RevocationUnavailableError, RevokedCertificateError
from services.common.runtime import service as runtime_module
from services.common.runtime.service import ServiceSettings, create_runtime
from tests.support.crl import CrlServer, build_crl, crl_server
from tests.support.pki import Issued, create_intermediate_ca, create_leaf, create_root_ca

TD = "ztbank.example"
RISK = f"spiffe://{TD}/env/prod/zone/az1/team/risk/svc/risk"


@pytest.fixture(scope="module")
def signing_ca() -> tuple[Issued, Issued]:
    root = create_root_ca()
    return root, create_intermediate_ca(root, common_name="runtime signing CA")


class StubSource:
    """Stands in for the Workload API client; records ``close``."""

    instances: list[StubSource] = []  # noqa: RUF012
    material: SvidMaterial

    def __init__(self, *_: Any, **__: Any) -> None:
        self.closed = False
        StubSource.instances.append(self)

    def current(self) -> SvidMaterial:
        return StubSource.material

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def stub_source(
    monkeypatch: pytest.MonkeyPatch, signing_ca: tuple[Issued, Issued]
) -> type[StubSource]:
    root, ca = signing_ca
    leaf = create_leaf(ca, uri_sans=[RISK])
    StubSource.material = SvidMaterial(
        spiffe_id=SpiffeId.parse(RISK),
        chain=(leaf.certificate, ca.certificate),
        key=leaf.key,
        bundle=(root.certificate, ca.certificate),
    )
    StubSource.instances = []
    monkeypatch.setattr(runtime_module, "SvidSource", StubSource)
    return StubSource


@pytest.fixture
def issuer() -> Iterator[CrlServer]:
    with crl_server() as server:
        yield server


def settings_for(tmp_path: Path, issuer: CrlServer, **overrides: Any) -> ServiceSettings:
    registry = tmp_path / "registry.json"
    write_registry(registry, [ServiceAddress("risk", "127.0.0.1", 50052)])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": []}))
    return ServiceSettings(
        home=tmp_path / "home",
        trust_domain=TD,
        issuer_http=f"127.0.0.1:{issuer.port}",
        registry=registry,
        policy=policy,
        audit_fsync=False,
        **overrides,
    )


@pytest.mark.usefixtures("settings_environment")
def test_the_runtime_verifies_peers_against_the_issuers_crls(
    tmp_path: Path,
    issuer: CrlServer,
    stub_source: type[StubSource],
    signing_ca: tuple[Issued, Issued],
) -> None:
    _, ca = signing_ca
    revoked = create_leaf(ca, uri_sans=[RISK])
    issuer.publish(build_crl(ca, [revoked.certificate]))
    runtime = create_runtime("risk", settings_for(tmp_path, issuer))
    try:
        assert runtime.revocation.url == f"http://127.0.0.1:{issuer.port}/crls"
        assert runtime.verifier.revocation is runtime.revocation
        assert runtime.revocation.fresh()
        with pytest.raises(RevokedCertificateError):
            runtime.revocation.check(revoked.certificate)
        runtime.revocation.check(stub_source.material.leaf)
    finally:
        runtime.close()
    assert stub_source.instances[0].closed


@pytest.mark.usefixtures("settings_environment")
def test_a_service_does_not_start_without_fresh_crls(
    tmp_path: Path, issuer: CrlServer, stub_source: type[StubSource]
) -> None:
    issuer.status = 404  # the issuer does not serve /crls (yet)
    settings = settings_for(tmp_path, issuer, revocation_timeout_seconds=0.3)
    with pytest.raises(RevocationUnavailableError, match=r"no fresh CRL from .*404"):
        create_runtime("risk", settings)
    assert stub_source.instances[0].closed  # nothing left running


@pytest.mark.usefixtures("settings_environment")
def test_revocation_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZTBANK_REVOCATION_INTERVAL_SECONDS", "2")
    monkeypatch.setenv("ZTBANK_REVOCATION_TIMEOUT_SECONDS", "7")
    settings = ServiceSettings()
    assert (settings.revocation_interval_seconds, settings.revocation_timeout_seconds) == (2, 7)
    assert settings.issuer_url == "http://127.0.0.1:8180"
    with pytest.raises(ValueError, match="greater than 0"):
        ServiceSettings(revocation_interval_seconds=0)
