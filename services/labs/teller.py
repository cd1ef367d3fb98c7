"""The channel app (the ``teller`` identity) against the gateway over mTLS: the client the labs
drive, and the one behind ``ztbank login``, ``accounts`` and ``transfer``, the benchmarks and the
end-to-end tests.  It lives with the labs, which must not import the CLI; the CLI imports it."""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from services.common.discovery.registry import FileRegistry
from services.common.errors import CommonError
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, TELLER
from services.common.identity.x509svid import verify_der_chain
from services.common.mtls.contexts import client_context
from services.common.revocation import (
    RevocationError,
    RevocationUnavailableError,
    RevocationWatcher,
    RevokedCertificateError,
)
from services.issuer.domain.revocation import crls_url
from services.labs.errors import FailedClosedError, LabError, LabUsageError
from services.stack.native import StackSettings, stack_hint, workload_svid

TIMEOUT = 10.0


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


class _VerifiedConnection(http.client.HTTPSConnection):
    """Checks the server's SPIFFE ID and revocation status right after the handshake, before
    any request is sent."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        bundle: SvidMaterial,
        expected: SpiffeId,
        revocation: Callable[[x509.Certificate], None],
    ) -> None:
        super().__init__(host, port, context=context, timeout=TIMEOUT)
        self._bundle = bundle
        self._expected = expected
        self._revocation = revocation

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        der = self.sock.getpeercert(binary_form=True)
        try:
            found = verify_der_chain(
                [der] if der else [], self._bundle.bundle, trust_domain=self._expected.trust_domain
            )
        except CommonError as error:
            self.close()
            raise LabError(f"the gateway's certificate is not acceptable: {error}") from None
        if found != self._expected:
            self.close()
            raise LabError(f"expected the gateway {self._expected}, got {found}")
        try:
            self._revocation(x509.load_der_x509_certificate(der or b""))
        except RevokedCertificateError as error:
            self.close()
            raise LabError(f"the gateway's certificate is revoked: {error}") from None
        except RevocationError as error:
            self.close()  # fail closed, as the services do
            raise FailedClosedError(
                f"cannot check the gateway's revocation status: {error}"
            ) from None


class TellerClient:
    def __init__(self, settings: StackSettings, material: SvidMaterial | None = None) -> None:
        """Acts with ``material`` if given (e.g. a minted SVID), else the teller's own SVID.

        The gateway's certificate is checked against the issuer's CRLs on every connection.
        They are fetched when first needed and again when what is held does not answer (stale
        or missing).  The last verified answer is kept under ZTBANK_HOME, so a client started
        during an issuer outage works as long as the services do.
        """
        self._settings = settings
        # The teller's own SVID is fetched again at half-life (a lab outlives a 20 s SVID); a
        # given one is presented as it is, expired or not.
        self._own = material is None
        if material is None:
            try:
                material = workload_svid(settings, TELLER.name)
            except CommonError as error:
                raise LabError(
                    f"no teller identity ({error}); {stack_hint(settings.home)}"
                ) from None
        self._material = material
        self._context = client_context(self._material, ["http/1.1"])
        self._address = FileRegistry(settings.registry).lookup(GATEWAY.name)
        self._gateway_id = GATEWAY.spiffe_id(settings.trust_domain)
        self._crls = RevocationWatcher(
            crls_url(settings.issuer_url),
            lambda: self._material.bundle,
            cache=settings.home / "cache" / "crls.pem",
        )

    def _check_revocation(self, gateway: x509.Certificate) -> None:
        try:
            self._crls.check(gateway)
        except RevocationUnavailableError:  # nothing held yet, or stale: ask the issuer
            self._crls.poll()
            self._crls.check(gateway)

    @property
    def material(self) -> SvidMaterial:
        """The SVID this client presents (and the bundle it trusts)."""
        return self._material

    def _renew(self) -> None:
        held = self._material
        if not self._own or held.seconds_left() > held.lifetime.total_seconds() / 2:
            return
        try:
            self._material = workload_svid(self._settings, TELLER.name)
        except CommonError:
            return  # the held one until it expires; then the gateway refuses it (fail closed)
        self._context = client_context(self._material, ["http/1.1"])

    def connect(self) -> http.client.HTTPSConnection:
        """A keep-alive connection for many requests (benchmarks); ``request`` opens its own."""
        self._renew()
        return _VerifiedConnection(
            self._address.host,
            self._address.port,
            self._context,
            bundle=self._material,
            expected=self._gateway_id,
            revocation=self._check_revocation,
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        connection: http.client.HTTPSConnection | None = None,
    ) -> Reply:
        keep = connection is not None
        connection = connection or self.connect()
        payload = json.dumps(body).encode() if body is not None else None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=all_headers)
            response = connection.getresponse()
            raw = response.read()
        except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected) as error:
            # A refused client certificate: under TLS 1.2 an alert in the handshake; under
            # TLS 1.3 the server checks it after the client has finished, then closes.
            connection.close()
            raise FailedClosedError(
                f"the gateway at {self._address.target} refused the TLS connection: {error}"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise LabError(f"cannot reach the gateway at {self._address.target}: {error}") from None
        if not keep:
            connection.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed)

    def token(self, customer: str) -> str:
        reply = self.request("POST", "/v1/tokens", body={"customer": customer})
        if reply.status != 201:
            raise refusal(reply)
        return str(reply.body["access_token"])

    def as_customer(self, customer: str, method: str, path: str, **kwargs: Any) -> Reply:
        token = self.token(customer)
        headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
        return self.request(method, path, headers=headers, **kwargs)

    def transfer(
        self, customer: str, source: str, target: str, amount: str, currency: str
    ) -> Reply:
        body = {
            "from_account": source,
            "to_account": target,
            "amount": amount,
            "currency": currency,
        }
        key = str(uuid.uuid4())
        reply = self.as_customer(
            customer, "POST", "/v1/transfers", body=body, headers={"Idempotency-Key": key}
        )
        if reply.status >= 500:
            # A retry with the same key can never post twice.
            reply = self.as_customer(
                customer, "POST", "/v1/transfers", body=body, headers={"Idempotency-Key": key}
            )
        return reply


def refusal(reply: Reply) -> LabError:
    """A gateway error as a lab error: 4xx is the caller's to fix (the usage kind), the rest a
    failure."""
    body = reply.body
    detail = (body.get("detail") or body.get("title")) if isinstance(body, dict) else body
    error_type = LabUsageError if 400 <= reply.status < 500 else LabError
    return error_type(f"gateway answered {reply.status}: {detail}")
