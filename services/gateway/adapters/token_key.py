"""The P-256 key that signs customer tokens, kept in one 0600 PEM file under ``ZTBANK_HOME``.

It survives restarts so that tokens issued before one stay valid until they expire.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.files import ensure_private_dir, write_private_key
from services.gateway.errors import TokenKeyError


def _load(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenKeyError(
                f"token signing key {path} is accessible by other users"
                f" (mode {stat.S_IMODE(mode):o}); it must be 0600"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise TokenKeyError(f"cannot read token signing key {path}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TokenKeyError(f"token signing key {path} is not an ECDSA P-256 key")
    return key


def load_or_create_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at ``path``; a new one is created there first if there is none."""
    if path.exists():
        return _load(path)
    # Written complete under a private name, then linked into place: link() never replaces, so
    # when two gateways start together both end up with whichever key was linked first.
    draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        ensure_private_dir(path.parent)
        write_private_key(draft, ec.generate_private_key(ec.SECP256R1()))
        try:
            with contextlib.suppress(FileExistsError):
                os.link(draft, path)
        finally:
            draft.unlink()
    except OSError as error:
        raise TokenKeyError(f"cannot create token signing key {path}: {error}") from None
    return _load(path)
