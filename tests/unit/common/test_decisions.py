"""One authorization decision: its audit record on disk and its count in ``authz.decisions``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Sum

from services.common.authz.audit import AuditLog
from services.common.authz.decisions import submit_decision
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.peer import PeerIdentity
from services.common.observability.telemetry import Telemetry, setup_telemetry

CALLER = "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/gateway"


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def telemetry(tmp_path: Path, reader: InMemoryMetricReader) -> Iterator[Telemetry]:
    instance = setup_telemetry(
        "unit", metrics_port=None, spans_path=tmp_path / "spans.jsonl", metric_readers=[reader]
    )
    yield instance
    instance.shutdown()


def decisions_counted(reader: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    data = reader.get_metrics_data()
    assert data is not None
    counted: dict[tuple[str, str], int] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "authz.decisions":
                    continue
                assert isinstance(metric.data, Sum)
                assert metric.data.is_monotonic
                for point in metric.data.data_points:
                    attributes = dict(point.attributes or {})
                    key = (str(attributes["service"]), str(attributes["decision"]))
                    counted[key] = int(point.value)
    return counted


def decide(audit: AuditLog, telemetry: Telemetry, service: str, decision: str) -> None:
    peer = PeerIdentity(SpiffeId.parse(CALLER), "0a", "ff" * 32, "127.0.0.1:5000")
    submit_decision(
        audit,
        telemetry,
        service=service,
        peer=peer,
        method="/ztbank.ledger.v1.TransferEngine/GetAccount",
        decision=decision,
        reason="policy",
        source=("127.0.0.1", 5000),
        dest=("127.0.0.1", 7001),
    ).result(timeout=5)


def test_every_decision_is_counted_by_service_and_outcome_and_audited(
    tmp_path: Path, telemetry: Telemetry, reader: InMemoryMetricReader
) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    try:
        for service, decision in [("engine", "allow")] * 3 + [
            ("engine", "deny"),
            ("risk", "allow"),
        ]:
            decide(audit, telemetry, service, decision)
        assert decisions_counted(reader) == {
            ("engine", "allow"): 3,
            ("engine", "deny"): 1,
            ("risk", "allow"): 1,
        }
        decide(audit, telemetry, "engine", "allow")
        assert decisions_counted(reader)[("engine", "allow")] == 4  # a running total
    finally:
        audit.close()
    records = [json.loads(line) for line in audit.path.read_text().splitlines()]
    assert [(r["service"], r["decision"]) for r in records][-2:] == [
        ("risk", "allow"),
        ("engine", "allow"),
    ]
    assert len(records) == 6
