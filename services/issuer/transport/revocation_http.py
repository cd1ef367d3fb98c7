"""The issuer's revocation endpoints: CRLs and OCSP over plain HTTP (the data is signed).

Routes (see README):

* ``GET /crl/<ca-serial-hex>.crl``: that signing CA's current CRL, DER, ``application/pkix-crl``;
* ``GET /crls``: every current CRL as concatenated PEM, ``application/x-pem-file`` (what the
  services' watcher polls; ``ETag``/``If-None-Match`` make polling cheap);
* ``POST /ocsp`` (body: DER ``application/ocsp-request``) and ``GET /ocsp/<base64 request>``
  (RFC 6960 appendix A; URL-safe or standard alphabet, padding optional):
  ``application/ocsp-response``; a malformed request gets HTTP 400 with a ``malformedRequest``
  OCSP body;
* ``GET /healthz``: JSON.

It runs under uvicorn inside the issuer's event loop, beside the gRPC servers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from cryptography.x509 import ocsp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.issuer.domain.crl import CrlPublisher
from services.issuer.domain.ocsp import OcspAnswer, OcspResponder, unsuccessful
from services.issuer.domain.revocation import CRLS_PATH, OCSP_PATH, parse_serial
from services.issuer.errors import IssuerError, RevocationError
from services.issuer.settings import parse_listen_address

logger = logging.getLogger(__name__)

CRL_TYPE = "application/pkix-crl"
PEM_TYPE = "application/x-pem-file"
OCSP_RESPONSE_TYPE = "application/ocsp-response"
# An OCSP request for one certificate is ~100 bytes; anything this large is not one.
MAX_OCSP_REQUEST = 16 * 1024
START_TIMEOUT = 10.0
# Revocation must reach relying parties at once: they may store a copy but must revalidate.
_NO_CACHE = {"Cache-Control": "no-cache"}


def _cached(request: Request, body: bytes, media_type: str) -> Response:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {**_NO_CACHE, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def _ocsp_response(answer: OcspAnswer) -> Response:
    malformed = answer.status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    return Response(
        answer.der,
        status_code=400 if malformed else 200,
        media_type=OCSP_RESPONSE_TYPE,
        headers=_NO_CACHE,
    )


def _malformed() -> Response:
    return _ocsp_response(unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST))


def create_app(crls: CrlPublisher, responder: OcspResponder) -> Starlette:
    async def crl(request: Request) -> Response:
        try:
            published = crls.get(parse_serial(request.path_params["ca_serial"]))
        except RevocationError:
            published = None
        if published is None:
            return PlainTextResponse("no such signing CA\n", status_code=404)
        return _cached(request, published.der, CRL_TYPE)

    async def crl_bundle(request: Request) -> Response:
        return _cached(request, crls.pem_bundle(), PEM_TYPE)

    async def ocsp_post(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_OCSP_REQUEST:
                return _malformed()
        return _ocsp_response(responder.respond(bytes(body)))

    async def ocsp_get(request: Request) -> Response:
        # The path arrives percent-decoded; accept both base64 alphabets, padding optional.
        text = request.path_params["encoded"].strip().replace("+", "-").replace("/", "_")
        if len(text) > 2 * MAX_OCSP_REQUEST:
            return _malformed()
        try:
            der = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return _malformed()
        return _ocsp_response(responder.respond(der))

    async def healthz(request: Request) -> Response:
        current = crls.current()
        return JSONResponse(
            {"status": "ok", "crls": len(current), "crl_number": crls.latest_number}
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route(CRLS_PATH, crl_bundle, methods=["GET"]),
            Route("/crl/{ca_serial}.crl", crl, methods=["GET"]),
            Route(OCSP_PATH, ocsp_post, methods=["POST"]),
            Route(OCSP_PATH + "/{encoded:path}", ocsp_get, methods=["GET"]),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM and SIGINT belong to the issuer."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise IssuerError(f"cannot listen on ZTBANK_ISSUER_HTTP {host}:{port}: {error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise IssuerError(f"cannot listen on ZTBANK_ISSUER_HTTP {host}:{port}: {error}") from None
    sock.setblocking(False)
    return sock


class RevocationEndpoint:
    """The app above under uvicorn, as a task of the running event loop."""

    def __init__(self, app: Starlette, listen: str) -> None:
        self._app = app
        self._host, self._port = parse_listen_address(listen)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = _bind(self._host, self._port)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        server = self._server = _EmbeddedServer(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not server.started:
            if task.done() or asyncio.get_running_loop().time() > deadline:
                sock.close()
                raise IssuerError(f"revocation endpoint on {self._host}:{self._port} did not start")
            await asyncio.sleep(0.01)
        logger.info("revocation endpoint (CRLs, OCSP) on http://%s:%d", self._host, self._port)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server = self._task = None
