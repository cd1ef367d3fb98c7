"""X509-SVIDs and bundles from the Workload API (py-spiffe), as material the TLS layers load.

The stock py-spiffe ``X509Source`` keeps a stream open to the issuer and retries on its own when
the issuer is away; this wrapper only converts what it holds and fans out rotation events.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from spiffe import TrustDomain, WorkloadApiClient, X509Source
from spiffe.workloadapi.x509_context import X509Context

from services.common.errors import CommonError
from services.common.files import private_key_pem
from services.common.identity.pem import certificates_to_pem, load_pem_certificates, serial_hex
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_x509_svid

logger = logging.getLogger(__name__)

Listener = Callable[["SvidMaterial"], None]
_SHA256 = hashes.SHA256()


class SvidUnavailableError(CommonError):
    """No X509-SVID could be obtained from the Workload API."""


@dataclass(frozen=True)
class SvidMaterial:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        return serial_hex(self.leaf)

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.leaf.not_valid_before_utc

    def seconds_left(self, now: datetime | None = None) -> float:
        return (self.not_after - (now or datetime.now(UTC))).total_seconds()

    @cached_property
    def chain_pem(self) -> bytes:
        return certificates_to_pem(self.chain)

    @cached_property
    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    @cached_property
    def bundle_pem(self) -> bytes:
        return certificates_to_pem(self.bundle)


def svid_from_pem(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, trust_domain: str
) -> SvidMaterial:
    """An SVID handed over as PEM (a minted one, or one passed between processes), checked to
    be a valid X509-SVID of ``trust_domain`` that chains to the bundle."""
    chain = tuple(load_pem_certificates(chain_pem))
    bundle = tuple(load_pem_certificates(bundle_pem))
    spiffe_id = verify_x509_svid(chain, bundle, trust_domain=trust_domain)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return SvidMaterial(spiffe_id=spiffe_id, chain=chain, key=key, bundle=bundle)


def _material(context: X509Context, trust_domain: str) -> SvidMaterial:
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(trust_domain))
    if svid is None or bundle is None:
        raise SvidUnavailableError("the Workload API sent no SVID or no trust bundle")
    return SvidMaterial(
        spiffe_id=SpiffeId.parse(str(svid.spiffe_id)),
        chain=tuple(svid.cert_chain),
        key=svid.private_key,
        bundle=tuple(sorted(bundle.x509_authorities, key=lambda c: c.fingerprint(_SHA256))),
    )


def fetch_svid(socket_uri: str, trust_domain: str, *, timeout: float = 10.0) -> SvidMaterial:
    """One SVID from the Workload API, for short-lived clients such as the CLI."""
    try:
        with WorkloadApiClient(socket_path=socket_uri) as client:
            context = client.fetch_x509_context(timeout=timeout)
    except Exception as error:  # py-spiffe raises several unrelated types
        raise SvidUnavailableError(
            f"no X509-SVID from the Workload API at {socket_uri}: {error}"
        ) from None
    return _material(context, trust_domain)


class SvidSource:
    """The workload's current SVID; listeners run (in py-spiffe's thread) after each rotation."""

    def __init__(self, socket_uri: str, trust_domain: str, *, timeout: float = 30.0) -> None:
        self._trust_domain = trust_domain
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        try:
            self._source = X509Source(socket_path=socket_uri, timeout_in_seconds=timeout)
        except Exception as error:  # py-spiffe raises several unrelated types
            raise SvidUnavailableError(
                f"no X509-SVID from the Workload API at {socket_uri}: {error}"
            ) from None
        self._material = self._read()
        self._source.subscribe_for_updates(self._on_update)

    def _read(self) -> SvidMaterial:
        return _material(self._source.get_x509_context(), self._trust_domain)

    def _on_update(self) -> None:
        try:
            material = self._read()
        except Exception:
            logger.exception("ignoring an unreadable Workload API update")
            return
        with self._lock:
            changed = material.serial != self._material.serial or (
                material.bundle_pem != self._material.bundle_pem
            )
            self._material = material
            listeners = list(self._listeners)
        if changed:
            logger.info("new X509-SVID %s, valid until %s", material.serial, material.not_after)
            for listener in listeners:
                try:
                    listener(material)
                except Exception:
                    logger.exception("SVID listener failed")

    def current(self) -> SvidMaterial:
        with self._lock:
            return self._material

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def close(self) -> None:
        self._source.close()
