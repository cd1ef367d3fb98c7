"""The running issuer's revocation plumbing, in process: start-up order and the CRL loop."""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.issuer.adapters.upstream.disk import init_root_ca
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


def test_crls_stay_fresh_while_the_upstream_fails(
    short_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CA maintenance needs the upstream; re-signing the CRLs does not.  An upstream outage
    must not let the CRLs run past nextUpdate, or every service would fail closed."""
    issuer = Issuer(issuer_settings(short_root, "127.0.0.1:1"))
    maintained: list[datetime] = []
    refreshed: list[datetime] = []

    def upstream_down() -> datetime:
        maintained.append(datetime.now(UTC))
        raise IssuerError("upstream CA unavailable: disk gone")

    def refresh(*, force: bool = False) -> datetime:
        refreshed.append(datetime.now(UTC))
        return datetime.now(UTC) + timedelta(seconds=0.05)

    monkeypatch.setattr(issuer.authority, "maintain", upstream_down)
    monkeypatch.setattr(issuer.crls, "refresh", refresh)

    async def a_while() -> None:
        loop = asyncio.create_task(issuer._maintain_forever())
        await asyncio.sleep(1.2)
        loop.cancel()

    with caplog.at_level(logging.ERROR):
        asyncio.run(a_while())
    assert "CA maintenance failed" in caplog.text
    assert 1 <= len(maintained) <= 2  # the upstream is retried after 1 s, then 2 s
    # The CRLs were re-signed on their own schedule, not only once per maintenance retry.
    assert len(refreshed) > len(maintained)
