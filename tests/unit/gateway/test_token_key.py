import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from services.common.files import write_private_key
from services.gateway.adapters.token_key import load_or_create_signing_key
from services.gateway.domain.tokens import key_id
from services.gateway.errors import TokenKeyError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_a_private_p256_key(tmp_path: Path) -> None:
    path = tmp_path / "var" / "gateway" / "token-signing.key"

    key = load_or_create_signing_key(path)

    assert isinstance(key.curve, ec.SECP256R1)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no draft left behind


def test_keeps_the_key_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "token-signing.key"
    first = load_or_create_signing_key(path)

    second = load_or_create_signing_key(path)

    assert key_id(first.public_key()) == key_id(second.public_key())


def test_a_key_created_concurrently_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token-signing.key"
    theirs = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, theirs)
    # As if the other gateway linked its key between our exists() check and our link().
    monkeypatch.setattr(Path, "exists", lambda self: False)

    ours = load_or_create_signing_key(path)

    assert key_id(ours.public_key()) == key_id(theirs.public_key())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644, 0o660])
def test_refuses_a_key_others_can_read(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "token-signing.key"
    load_or_create_signing_key(path)
    path.chmod(loose)

    with pytest.raises(TokenKeyError, match="0600"):
        load_or_create_signing_key(path)


def test_refuses_other_key_types(tmp_path: Path) -> None:
    for name, key in (
        ("p384.key", ec.generate_private_key(ec.SECP384R1())),
        ("ed25519.key", ed25519.Ed25519PrivateKey.generate()),
    ):
        write_private_key(tmp_path / name, key)
        with pytest.raises(TokenKeyError, match="P-256"):
            load_or_create_signing_key(tmp_path / name)


def test_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "token-signing.key"
    path.write_bytes(b"not a key")
    path.chmod(0o600)

    with pytest.raises(TokenKeyError, match="cannot read"):
        load_or_create_signing_key(path)


def test_refuses_encrypted_keys(tmp_path: Path) -> None:
    path = tmp_path / "token-signing.key"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    path.chmod(0o600)

    with pytest.raises(TokenKeyError, match="cannot read"):
        load_or_create_signing_key(path)


def test_unwritable_directory_is_a_token_key_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    with pytest.raises(TokenKeyError, match="cannot create"):
        load_or_create_signing_key(blocker / "gateway" / "token-signing.key")
