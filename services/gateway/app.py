"""``create_app``: the gateway's FastAPI application, wired from settings and its adapters.

The HTTPS/mTLS server in front of it verifies the caller's X509-SVID and sets
``services.common.mtls.peer.set_current_peer`` for the request before this app runs.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from services.common.problem import Problem, openapi_components
from services.gateway.adapters.customer_directory import EngineCustomerDirectory
from services.gateway.domain.banking import Banking
from services.gateway.domain.ledger import TransferEngine
from services.gateway.domain.tokens import Clock, CustomerTokens, utc_now
from services.gateway.route_table import OPENAPI
from services.gateway.settings import GatewaySettings
from services.gateway.transport.limits import MAX_BODY_BYTES, BodyLimit
from services.gateway.transport.problems import install_problem_handlers
from services.gateway.transport.routes import BEARER_SCHEME, HealthReport, create_router
from services.gateway.transport.schemas import RejectedTransferProblem, ValidationProblem

TITLE = "ztbank gateway"
VERSION = "1.0.0"


class _GatewayApi(FastAPI):
    def openapi(self) -> dict[str, Any]:
        # Problem responses and the bearer scheme are referenced by hand (FastAPI files models
        # under application/json only), so their schemas are added to the generated document.
        if self.openapi_schema is None:
            document = super().openapi()  # cached in self.openapi_schema
            components = document.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(openapi_components(Problem, ValidationProblem, RejectedTransferProblem))
            components.setdefault("securitySchemes", {}).update(BEARER_SCHEME)
        return super().openapi()


def create_app(
    settings: GatewaySettings,
    engine: TransferEngine,
    token_key: ec.EllipticCurvePrivateKey,
    *,
    health: HealthReport,
    clock: Clock = utc_now,
) -> FastAPI:
    """The gateway API over ``engine``, signing customer tokens with ``token_key``; its health
    routes answer from ``health``."""
    tokens = CustomerTokens(
        key=token_key,
        issuer=str(settings.gateway_id),
        ttl=settings.token_ttl,
        directory=EngineCustomerDirectory(engine),
        clock=clock,
    )
    app = _GatewayApi(
        title=TITLE,
        version=VERSION,
        description=(
            "Public REST API of ztbank for channel apps. Every connection is mutual TLS with a"
            " SPIFFE identity; customers act through short-lived bearer tokens that only the"
            " teller can obtain. Errors are RFC 9457 application/problem+json."
        ),
        # The schema is the teller's to fetch, as the policy says.  No /docs or /redoc: their
        # pages load Swagger UI and ReDoc from a CDN, which offline and air-gapped installs
        # cannot reach.
        openapi_url=OPENAPI.path,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    install_problem_handlers(app)
    app.include_router(
        create_router(
            banking=Banking(engine), tokens=tokens, teller_id=settings.teller_id, health=health
        )
    )
    return app
