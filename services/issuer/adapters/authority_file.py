"""Persists the issuer's signing slots (keys included) in one 0600 JSON file."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.files import PRIVATE_MODE, ensure_private_dir, private_key_pem, write_atomic
from services.issuer.domain.authority import AuthorityState, Slot
from services.issuer.errors import IssuerError


def _certs_pem(certs: tuple[x509.Certificate, ...]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _load_certs(pem: str) -> tuple[x509.Certificate, ...]:
    return tuple(x509.load_pem_x509_certificates(pem.encode())) if pem else ()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IssuerError("stored signing key is not an ECDSA key")
    return key


def _slot_to_json(slot: Slot) -> dict[str, Any]:
    return {
        "ca_cert": _certs_pem((slot.ca_cert,)),
        "ca_key": private_key_pem(slot.ca_key).decode(),
        "upstream_chain": _certs_pem(slot.upstream_chain),
        "roots": _certs_pem(slot.roots),
        "jwt_key": private_key_pem(slot.jwt_key).decode(),
        "jwt_kid": slot.jwt_kid,
        "issued_at": slot.issued_at.isoformat(),
    }


def _slot_from_json(data: dict[str, Any]) -> Slot:
    return Slot(
        ca_cert=_load_certs(data["ca_cert"])[0],
        ca_key=_load_key(data["ca_key"]),
        upstream_chain=_load_certs(data["upstream_chain"]),
        roots=_load_certs(data["roots"]),
        jwt_key=_load_key(data["jwt_key"]),
        jwt_kid=data["jwt_kid"],
        issued_at=datetime.fromisoformat(data["issued_at"]),
    )


class AuthorityFile:
    def __init__(self, path: Path) -> None:
        self._path = path

    def load(self) -> AuthorityState:
        if not self._path.exists():
            return AuthorityState()
        try:
            data = json.loads(self._path.read_text())
            return AuthorityState(
                active=_slot_from_json(data["active"]) if data.get("active") else None,
                prepared=_slot_from_json(data["prepared"]) if data.get("prepared") else None,
                retired=[_slot_from_json(item) for item in data.get("retired", [])],
                next_number=int(data.get("next_number", 1)),
            )
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise IssuerError(f"cannot read the issuer's CA state {self._path}: {error}") from None

    def save(self, state: AuthorityState) -> None:
        ensure_private_dir(self._path.parent)
        data = {
            "active": _slot_to_json(state.active) if state.active else None,
            "prepared": _slot_to_json(state.prepared) if state.prepared else None,
            "retired": [_slot_to_json(slot) for slot in state.retired],
            "next_number": state.next_number,
        }
        write_atomic(self._path, json.dumps(data, indent=1).encode(), PRIVATE_MODE)
