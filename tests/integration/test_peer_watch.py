"""The breaker's peer watch against a real TLS listener: it keeps the certificate a callee
serves only if that certificate is a valid, unrevoked X509-SVID of the expected SPIFFE ID."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.common.identity.pem import serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier
from services.common.resilience.peer_watch import PeerWatch
from services.common.revocation import RevocationListener, RevokedCertificateError
from tests.support.mtls_servers import ENGINE_ID, RISK_ID, TD, Authority, new_authority

pytestmark = pytest.mark.integration


class Revoked:
    """A RevocationChecker with a hand-set list of revoked serials."""

    def __init__(self) -> None:
        self.serials: set[int] = set()

    def check(self, leaf: object) -> None:
        if getattr(leaf, "serial_number", None) in self.serials:
            raise RevokedCertificateError("certificate revoked")

    def subscribe(self, listener: RevocationListener) -> None:
        del listener

    def revoked_serials(self) -> frozenset[str]:
        return frozenset(format(serial, "x") for serial in self.serials)


@contextmanager
def serving(material: SvidMaterial, directory: Path) -> Iterator[str]:
    """A TLS listener on 127.0.0.1 that completes handshakes with ``material``, then hangs up."""
    chain, key = directory / "chain.pem", directory / "key.pem"
    chain.write_bytes(material.chain_pem)
    key.write_bytes(material.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), context.wrap_socket(raw, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def authority() -> Authority:
    return new_authority("peer watch")


def watch(authority: Authority, target: str, revoked: Revoked | None = None) -> PeerWatch:
    """The engine's watch of risk (not started: the test calls ``look()``)."""
    engine = authority.svid(ENGINE_ID)
    return PeerWatch(
        target=lambda: target,
        material=lambda: engine,
        verifier=PeerVerifier(lambda: engine, TD, revocation=revoked or Revoked()),
        expected=SpiffeId.parse(RISK_ID),
    )


def test_the_served_certificate_is_kept(authority: Authority, tmp_path: Path) -> None:
    risk = authority.svid(RISK_ID, dns=("risk",))
    with serving(risk, tmp_path) as target:
        peer = watch(authority, target)
        peer.look()
    seen = peer.certificate
    assert seen is not None, peer.problem
    assert seen.spiffe_id == SpiffeId.parse(RISK_ID)
    assert seen.serial == serial_hex(risk.leaf)
    assert seen.not_after == risk.leaf.not_valid_after_utc.timestamp()
    assert seen.not_before == risk.leaf.not_valid_before_utc.timestamp()


def test_an_unreachable_callee_keeps_its_last_certificate(
    authority: Authority, tmp_path: Path
) -> None:
    with serving(authority.svid(RISK_ID), tmp_path) as target:
        peer = watch(authority, target)
        peer.look()
    peer.look()  # the listener is gone
    assert peer.certificate is not None


def test_never_reached_says_why(authority: Authority, tmp_path: Path) -> None:
    with serving(authority.svid(RISK_ID), tmp_path) as target:
        pass
    peer = watch(authority, target)
    peer.look()
    assert peer.certificate is None
    assert peer.problem.startswith(f"no verified handshake with {RISK_ID} yet: ")


def test_another_spiffe_id_is_not_kept(authority: Authority, tmp_path: Path) -> None:
    other = f"spiffe://{TD}/env/prod/zone/az1/team/risk/svc/other"
    with serving(authority.svid(other), tmp_path) as target:
        peer = watch(authority, target)
        peer.look()
    assert peer.certificate is None
    assert peer.problem == (
        f"{target} served a certificate that failed verification: it is {other}, expected {RISK_ID}"
    )


def test_a_revoked_certificate_is_not_kept(authority: Authority, tmp_path: Path) -> None:
    risk = authority.svid(RISK_ID)
    revoked = Revoked()
    with serving(risk, tmp_path) as target:
        peer = watch(authority, target, revoked)
        peer.look()
        assert peer.certificate is not None
        revoked.serials.add(risk.leaf.serial_number)
        peer.look()
    assert peer.certificate is None
    assert peer.problem.endswith("failed verification: certificate revoked")


def test_a_certificate_of_a_foreign_ca_is_not_kept(authority: Authority, tmp_path: Path) -> None:
    foreign = new_authority("foreign").svid(RISK_ID)
    with serving(foreign, tmp_path) as target:
        peer = watch(authority, target)
        peer.look()
    assert peer.certificate is None
    assert "failed verification" in peer.problem
