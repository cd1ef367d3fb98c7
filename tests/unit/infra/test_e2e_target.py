"""tests/e2e/target.py: how the e2e suites reach a stack that is already up (compose, or
``make test-e2e-existing``).  Jaeger's query API is served here by a local HTTP server with
replies in the shape Jaeger's ``/api/traces/{id}`` returns."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.e2e.target import jaeger_trace

TRACE = "0af7651916cd43dd8448eb211c80319c"
SHORT_TRACE = "00000000000000008448eb211c80319c"  # Jaeger drops the zero high half

JAEGER_REPLY = {
    "data": [
        {
            "traceID": TRACE,
            "spans": [
                {"traceID": TRACE, "spanID": "b7ad6b7169203331", "operationName":
                 "POST /v1/transfers", "references": [], "processID": "p1"},
                {"traceID": TRACE, "spanID": "0d2b6a1c33f4e5a6", "operationName":
                 "ztbank.ledger.v1.Ledger/CreateTransfer", "processID": "p2", "references": [
                     {"refType": "FOLLOWS_FROM", "traceID": TRACE, "spanID": "1111111111111111"},
                     {"refType": "CHILD_OF", "traceID": TRACE, "spanID": "b7ad6b7169203331"},
                 ]},
                {"traceID": TRACE, "spanID": "d2b6a1c33f4e5a6", "operationName": "assess",
                 "processID": "p3", "references": [
                     {"refType": "CHILD_OF", "traceID": TRACE, "spanID": "0d2b6a1c33f4e5a6"},
                 ]},
            ],
            "processes": {
                "p1": {"serviceName": "gateway", "tags": []},
                "p2": {"serviceName": "transfer-engine", "tags": []},
                "p3": {"serviceName": "risk", "tags": []},
            },
        }
    ]
}  # fmt: skip


@pytest.fixture
def jaeger() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path in (f"/api/traces/{TRACE}", f"/api/traces/{SHORT_TRACE}")
            body: Any = JAEGER_REPLY if found else {"data": None, "errors": [{"code": 404}]}
            if self.path == f"/api/traces/{SHORT_TRACE}":
                body = json.loads(json.dumps(body).replace(TRACE, SHORT_TRACE.lstrip("0")))
            payload = json.dumps(body).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_jaeger_trace_becomes_span_sink_records_with_parents(jaeger: str) -> None:
    spans = {s["service"]: s for s in jaeger_trace(jaeger, TRACE)}
    assert spans["gateway"] == {
        "trace_id": TRACE,
        "span_id": "b7ad6b7169203331",
        "parent_id": None,
        "name": "POST /v1/transfers",
        "service": "gateway",
    }
    assert spans["transfer-engine"]["parent_id"] == "b7ad6b7169203331"  # CHILD_OF, not FOLLOWS
    assert spans["risk"]["span_id"] == "0d2b6a1c33f4e5a6"  # IDs padded as the sink writes them
    assert spans["risk"]["parent_id"] == spans["transfer-engine"]["span_id"]


def test_jaeger_ids_without_their_zero_high_half_are_padded(jaeger: str) -> None:
    assert {s["trace_id"] for s in jaeger_trace(jaeger, SHORT_TRACE)} == {SHORT_TRACE}


def test_a_trace_jaeger_does_not_know_yet_is_empty(jaeger: str) -> None:
    assert jaeger_trace(jaeger, "ffffffffffffffffffffffffffffffff") == []
