"""Permission-aware atomic writes for keys, certificates and state."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.files import (
    PRIVATE_DIR_MODE,
    PRIVATE_MODE,
    PUBLIC_MODE,
    ensure_private_dir,
    write_atomic,
    write_private_key,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """A umask of 0 shows the modes the code sets, not what the umask happens to remove."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_write_atomic_default_mode_and_content(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "bundle.pem"
    write_atomic(path, b"hello")
    assert path.read_bytes() == b"hello"
    assert mode(path) == PUBLIC_MODE == 0o644


def test_write_atomic_explicit_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"{}", 0o640)
    assert mode(path) == 0o640


def test_write_atomic_replaces_content_and_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "svid.key"
    write_atomic(path, b"old", 0o666)
    write_atomic(path, b"new", PRIVATE_MODE)
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["svid.key"]


def test_write_atomic_replaces_rather_than_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "chain.pem"
    write_atomic(path, b"first")
    with path.open("rb") as reader:  # e.g. a TLS library reading while we rotate
        write_atomic(path, b"second")
        assert reader.read() == b"first"
    assert path.read_bytes() == b"second"


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "chain.pem"
    write_atomic(path, b"first")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["chain.pem"]


def test_write_private_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "keys" / "svid.key"
    write_private_key(path, key)
    assert mode(path) == PRIVATE_MODE == 0o600
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    pkcs8_unencrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert path.read_bytes() == pkcs8_unencrypted


def test_ensure_private_dir_creates_0700(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    assert ensure_private_dir(path) == path
    assert path.is_dir()
    assert mode(path) == PRIVATE_DIR_MODE == 0o700


def test_ensure_private_dir_tightens_an_existing_dir(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir(mode=0o777)
    (path / "keep").write_text("x")
    ensure_private_dir(path)
    assert mode(path) == 0o700
    assert (path / "keep").read_text() == "x"
