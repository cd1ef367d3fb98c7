"""The gateway's routes, in one place and without FastAPI: the app declares its routes with these
paths, and ``ztbank workload`` (which must not load FastAPI) names them as the policy and the
audit records do ("HTTP-METHOD /path") when it says what the gateway serves."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    method: str
    path: str

    @property
    def name(self) -> str:
        """As policy rules and audit records name the route."""
        return f"{self.method} {self.path}"


# FastAPI's own route on the app: the API's schema, for the teller to fetch.
OPENAPI = Route("GET", "/openapi.json")
ISSUE_TOKEN = Route("POST", "/v1/tokens")
LIST_ACCOUNTS = Route("GET", "/v1/accounts")
GET_ACCOUNT = Route("GET", "/v1/accounts/{account_id}")
LIST_TRANSACTIONS = Route("GET", "/v1/accounts/{account_id}/transactions")
CREATE_TRANSFER = Route("POST", "/v1/transfers")
GET_TRANSFER = Route("GET", "/v1/transfers/{transfer_id}")

# Every route the policy's rules decide (not /healthz, which every verified peer may ask); a unit
# test checks that the app serves exactly these.
GATEWAY_ROUTES = tuple(
    route.name
    for route in (
        OPENAPI,
        ISSUE_TOKEN,
        LIST_ACCOUNTS,
        GET_ACCOUNT,
        LIST_TRANSACTIONS,
        CREATE_TRANSFER,
        GET_TRANSFER,
    )
)
