"""Fixtures shared by the unit suites."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.helpers import scrub_environment


@pytest.fixture
def settings_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets is seen; relative defaults resolve under an empty tmp dir.

    Settings tests use it for every test: ``pytestmark = pytest.mark.usefixtures(...)``.
    """
    scrub_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_developer_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests never see the developer's ZTBANK_/SPIFFE_/VAULT_/OTEL_ variables."""
    scrub_environment(monkeypatch)
