"""Which stack the e2e suites run against, and how they reach what it keeps.

``ZTBANK_E2E_STACK=sandbox`` (the default; ``make test-e2e``): conftest starts a private native
stack with a 20 s SVID TTL and stops it afterwards.

``ZTBANK_E2E_STACK=existing``: a stack someone else started and will stop — ``make
test-e2e-existing`` (a native stack of its own, in a temp dir) or ``make test-compose`` (the
``e2e`` service inside the compose network).  The suites find it through the settings every
ztbank process reads (``ZTBANK_HOME`` of the issuer, ``ZTBANK_CERTS_DIR``, ``ZTBANK_REGISTRY``,
``ZTBANK_TRUST_DOMAIN``, ``ZTBANK_ISSUER_HTTP``) plus the ``ZTBANK_E2E_*`` variables below.
What such a stack cannot give (stopping its processes, a short TTL) makes the tests that need
it skip, saying why; so does the absence of a Vault upstream for tests/e2e/test_vault_upstream.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class E2ETargetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZTBANK_E2E_", extra="ignore")

    stack: Literal["sandbox", "existing"] = "sandbox"
    # Each workload's SVID and each service's files come from where the stack's settings say
    # (StackSettings: ZTBANK_STACK_KIND, ZTBANK_WORKLOAD_UIDS, ZTBANK_SERVICE_HOME), as for the
    # labs beside that stack.
    # Where spans end up: the services' JSONL files, or Jaeger's query API behind the collector.
    traces: Literal["files", "jaeger"] = "files"
    jaeger_url: str = "http://jaeger:16686"
    ready_timeout: float = 90.0
    # A stack whose issuer Vault signs (make test-compose; "" elsewhere: those tests skip):
    # Vault's address and the CA of its listener, the directory where vault-bootstrap wrote
    # root-ca.pem, approle.json and init.json, and Vault's file audit log.
    vault_addr: str = ""
    vault_cacert: str = ""
    vault_bootstrap_dir: str = ""
    vault_audit_log: str = ""


def jaeger_trace(jaeger_url: str, trace_id: str) -> list[dict[str, Any]]:
    """One trace from Jaeger's query API, as the span sink's records (trace_id, span_id,
    parent_id, name, service); [] while Jaeger does not know it."""
    try:
        with urllib.request.urlopen(f"{jaeger_url}/api/traces/{trace_id}", timeout=5) as reply:
            document = json.load(reply)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise
    records = []
    for trace in document.get("data") or []:
        processes = trace.get("processes", {})
        for span in trace.get("spans", []):
            parents = [
                r["spanID"] for r in span.get("references", []) if r.get("refType") == "CHILD_OF"
            ]
            records.append(
                {
                    "trace_id": span["traceID"].zfill(32),
                    "span_id": span["spanID"].zfill(16),
                    "parent_id": parents[0].zfill(16) if parents else None,
                    "name": span["operationName"],
                    "service": processes.get(span.get("processID"), {}).get("serviceName"),
                }
            )
    return records
