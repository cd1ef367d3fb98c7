"""The revocation endpoints over HTTP: routes, content types, status codes, the embedded server."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
from collections.abc import Callable, Mapping
from urllib.parse import quote

import httpx2 as httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from starlette.applications import Starlette

from services.issuer.errors import IssuerError
from services.issuer.transport.revocation_http import (
    CRL_TYPE,
    MAX_OCSP_REQUEST,
    OCSP_RESPONSE_TYPE,
    PEM_TYPE,
    RevocationEndpoint,
    create_app,
)
from tests.unit.issuer.revocation_world import LEDGER, World


def call(
    app: Starlette,
    method: str,
    path: str,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://issuer") as client:
            return await client.request(method, path, content=content, headers=headers)

    return asyncio.run(run())


def ocsp_request(world: World, *, revoke: bool = False) -> bytes:
    svid = world.service.mint(LEDGER)
    if revoke:
        world.service.revoke_serial(format(svid.leaf.serial_number, "x"))
        world.crls.refresh(force=True)
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(svid.leaf, svid.chain[1], hashes.SHA1())
        .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
        .build()
    )
    return request.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def app(world: World) -> Starlette:
    world.crls.refresh()
    return create_app(world.crls, world.ocsp)


# -- CRLs -------------------------------------------------------------------------------------


def test_crl_of_a_ca_is_der(world: World, app: Starlette) -> None:
    serial = world.signer().serial
    response = call(app, "GET", f"/crl/{serial}.crl")
    assert response.status_code == 200
    assert response.headers["content-type"] == CRL_TYPE
    assert response.headers["cache-control"] == "no-cache"
    crl = x509.load_der_x509_crl(response.content)
    assert crl.issuer == world.signer().ca_cert.subject
    # Serial as openssl prints it (upper case) finds the same CRL.
    assert call(app, "GET", f"/crl/{serial.upper()}.crl").content == response.content


@pytest.mark.parametrize("path", ["/crl/abcdef.crl", "/crl/not-hex.crl", "/crl/.crl", "/crl/x"])
def test_unknown_ca_crl_is_404(app: Starlette, path: str) -> None:
    assert call(app, "GET", path).status_code == 404


def test_crls_is_every_current_crl_as_pem(world: World, app: Starlette) -> None:
    response = call(app, "GET", "/crls")
    assert response.status_code == 200
    assert response.headers["content-type"] == PEM_TYPE
    assert response.content == world.crls.pem_bundle()
    assert response.content.startswith(b"-----BEGIN X509 CRL-----")


def test_crls_change_after_a_revocation_and_etag_saves_polling(
    world: World, app: Starlette
) -> None:
    first = call(app, "GET", "/crls")
    etag = first.headers["etag"]
    unchanged = call(app, "GET", "/crls", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304
    assert unchanged.content == b""

    ocsp_request(world, revoke=True)

    changed = call(app, "GET", "/crls", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    crl = x509.load_pem_x509_crl(changed.content)
    assert len(list(crl)) == 1


def test_methods_other_than_get_are_refused_on_crls(app: Starlette) -> None:
    assert call(app, "POST", "/crls", content=b"x").status_code == 405


# -- OCSP -------------------------------------------------------------------------------------


def test_ocsp_post(world: World, app: Starlette) -> None:
    response = call(
        app,
        "POST",
        "/ocsp",
        content=ocsp_request(world, revoke=True),
        headers={"Content-Type": "application/ocsp-request"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == OCSP_RESPONSE_TYPE
    parsed = ocsp.load_der_ocsp_response(response.content)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert parsed.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == (
        b"0123456789abcdef"
    )


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda der: base64.urlsafe_b64encode(der).decode().rstrip("="), id="urlsafe"),
        pytest.param(lambda der: quote(base64.b64encode(der).decode(), safe=""), id="rfc6960"),
        pytest.param(lambda der: base64.b64encode(der).decode(), id="raw-standard"),
    ],
)
def test_ocsp_get(world: World, app: Starlette, encode: Callable[[bytes], str]) -> None:
    der = ocsp_request(world)
    response = call(app, "GET", f"/ocsp/{encode(der)}")
    assert response.status_code == 200, response.content
    assert response.headers["content-type"] == OCSP_RESPONSE_TYPE
    parsed = ocsp.load_der_ocsp_response(response.content)
    assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/ocsp", b"garbage"),
        ("POST", "/ocsp", b""),
        ("POST", "/ocsp", b"\x30" * (MAX_OCSP_REQUEST + 1)),
        ("GET", "/ocsp/%%%%", None),
        ("GET", "/ocsp/Z2FyYmFnZQ", None),  # base64 of "garbage"
        ("GET", "/ocsp/a", None),
    ],
)
def test_malformed_ocsp_request_is_400_with_an_ocsp_body(
    app: Starlette, method: str, path: str, body: bytes | None
) -> None:
    response = call(app, method, path, content=body)
    assert response.status_code == 400
    assert response.headers["content-type"] == OCSP_RESPONSE_TYPE
    parsed = ocsp.load_der_ocsp_response(response.content)
    assert parsed.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_healthz(world: World, app: Starlette) -> None:
    response = call(app, "GET", "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "crls": 1, "crl_number": world.crls.latest_number}


# -- the embedded server ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_endpoint_serves_on_its_port_and_stops(world: World, app: Starlette) -> None:
    port = free_port()
    handler = signal.getsignal(signal.SIGTERM)

    async def run() -> tuple[int, bytes]:
        endpoint = RevocationEndpoint(app, f"127.0.0.1:{port}")
        await endpoint.start()
        try:
            # uvicorn's own signal handlers are not installed: SIGTERM stays the issuer's.
            assert signal.getsignal(signal.SIGTERM) is handler
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/crls")
        finally:
            await endpoint.stop()
        return response.status_code, response.content

    status, body = asyncio.run(run())
    assert status == 200
    assert body == world.crls.pem_bundle()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # released


def test_endpoint_on_a_busy_port_fails_to_start(app: Starlette) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def run() -> None:
            await RevocationEndpoint(app, f"127.0.0.1:{port}").start()

        with pytest.raises(
            IssuerError, match=f"cannot listen on ZTBANK_ISSUER_HTTP 127.0.0.1:{port}"
        ):
            asyncio.run(run())


def test_stopping_an_endpoint_that_never_started_is_harmless(app: Starlette) -> None:
    asyncio.run(RevocationEndpoint(app, "127.0.0.1:1").stop())
