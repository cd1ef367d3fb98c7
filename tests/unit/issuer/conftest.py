"""Fixtures of the issuer's unit tests."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from services.issuer.adapters.upstream.disk import init_root_ca
from services.issuer.domain.certificates import sign_signing_ca
from tests.unit.issuer.revocation_world import TD, FakeClock, World, build_world


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    # Whole seconds, so X.509 times equal the clock exactly.
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))

    def sign_at_fake_now(csr: x509.CertificateSigningRequest, **kwargs: Any) -> x509.Certificate:
        return sign_signing_ca(csr, **kwargs, now=clock())

    monkeypatch.setattr("services.issuer.adapters.upstream.disk.sign_signing_ca", sign_at_fake_now)
    init_root_ca(tmp_path / "certs", TD)
    return build_world(tmp_path, clock)
