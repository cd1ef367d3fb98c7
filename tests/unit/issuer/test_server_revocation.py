"""The running issuer's revocation plumbing, in process: start-up order and the CRL loop."""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.issuer.adapters.upstream_disk import init_root_ca
from services.issuer.errors import IssuerError
from services.issuer.server import CRL_RETRY_DELAY, Issuer
from services.issuer.settings import IssuerSettings

TD = "ztbank.example"


def issuer_settings(root: Path, listen: str) -> IssuerSettings:
    init_root_ca(root / "certs", TD)
    return IssuerSettings(home=root / "home", certs_dir=root / "certs", issuer_http=listen)


@pytest.fixture
def short_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Unix socket paths must stay short; pytest's default base can be deep.
    return tmp_path_factory.mktemp("srv")


def test_a_busy_http_port_stops_the_issuer_before_any_socket_serves(short_root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = issuer_settings(short_root, f"127.0.0.1:{port}")

        with pytest.raises(IssuerError, match="cannot listen on ZTBANK_ISSUER_HTTP"):
            asyncio.run(Issuer(settings).start())

    assert not settings.workload_socket.exists()
    assert not settings.admin_socket.exists()


def test_a_failing_crl_refresh_is_logged_and_retried(
    short_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = Issuer(issuer_settings(short_root, "127.0.0.1:1"))

    def broken(*, force: bool = False) -> datetime:
        raise OSError("disk full")

    monkeypatch.setattr(issuer.crls, "refresh", broken)
    before = datetime.now(UTC)
    with caplog.at_level(logging.ERROR):
        due = issuer._refresh_crls()
    assert before + timedelta(seconds=CRL_RETRY_DELAY) <= due
    assert due <= datetime.now(UTC) + timedelta(seconds=CRL_RETRY_DELAY)
    assert "re-signing the CRLs failed" in caplog.text
    assert "disk full" in caplog.text
