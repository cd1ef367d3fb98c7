"""OpenTelemetry for every service: traces, metrics and W3C context propagation.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans and metrics go to that collector over OTLP/HTTP.
Otherwise metrics are served as Prometheus text on ``<metrics host>:<metrics port>/metrics`` (the
host the service itself listens on: loopback natively, its compose name in a container) and spans
are appended as JSON lines to a local sink file.

Identity health is observable: ``svid.expiry`` / ``svid.valid`` / ``svid.lifetime`` for the
held SVID (labelled with its SPIFFE ID and serial), ``tls.handshake.duration`` by role and
status and, with a revocation watcher, ``revocation.fresh`` (1 while every held CRL is fresh, 0
when new connections are being refused: the alert), ``revocation.age`` (seconds since the
stalest CRL was fetched) and ``revocation.revoked`` (serials currently listed as revoked).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from services.common.errors import CommonError
from services.common.identity.source import SvidMaterial

OTLP_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
EXEMPLAR_FILTER_ENV = "OTEL_METRICS_EXEMPLAR_FILTER"


class RevocationStatus(Protocol):
    """What the revocation metrics read (``RevocationWatcher``)."""

    def fresh(self) -> bool: ...

    def age_seconds(self) -> float | None: ...

    def revoked_serials(self) -> frozenset[str]: ...


class JsonLinesSpanExporter(SpanExporter):
    """The local span sink: one JSON object per finished span."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.get_span_context()
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "service": span.resource.attributes.get("service.name"),
                        "trace_id": format(context.trace_id, "032x") if context else None,
                        "span_id": format(context.span_id, "016x") if context else None,
                        "parent_id": format(parent.span_id, "016x") if parent else None,
                        "kind": span.kind.name,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                    },
                    default=str,
                )
            )
        with self._lock, self._path.open("a") as sink:
            sink.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


class DecisionCounts:
    """The ``authz.decisions`` counter, kept as plain counts and read by the meter at collection
    time: an OTel ``Counter.add`` (attribute hashing, aggregation) cost more than the rest of a
    decision's bookkeeping."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def add(self, service: str, decision: str) -> None:
        key = (service, decision)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def observe(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._counts.items())
        for (service, decision), count in counts:
            yield Observation(count, {"service": service, "decision": decision})


@dataclass
class Telemetry:
    tracer: trace.Tracer
    meter: Meter
    handshake_duration: Histogram
    authz_decisions: DecisionCounts
    transfer_duration: Histogram
    _shutdown: Callable[[], None]

    def shutdown(self) -> None:
        self._shutdown()


class MetricsListenError(CommonError):
    """The metrics port of the registry cannot be listened on (taken, or not this machine's)."""


def setup_telemetry(
    service: str,
    *,
    metrics_port: int | None,
    spans_path: Path,
    metrics_host: str = "127.0.0.1",
    svid: Callable[[], SvidMaterial] | None = None,
    revocation: RevocationStatus | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> Telemetry:
    """``metric_readers`` are added to the configured ones (tests read metrics in memory)."""
    resource = Resource.create({"service.name": service, "service.namespace": "ztbank"})
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = list(metric_readers)
    if os.environ.get(OTLP_ENV):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    else:
        tracer_provider.add_span_processor(
            BatchSpanProcessor(JsonLinesSpanExporter(spans_path), schedule_delay_millis=500)
        )
        if metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server

            readers.append(PrometheusMetricReader())
            try:
                start_http_server(metrics_port, addr=metrics_host)
            except OSError as error:
                raise MetricsListenError(
                    f"cannot serve metrics on {metrics_host}:{metrics_port}:"
                    f" {error.strerror or error}"
                ) from None
    # Exemplars cost more than the measurement they ride on (measured under load) and nothing
    # here reads them; OTEL_METRICS_EXEMPLAR_FILTER turns them on.
    exemplars = None if os.environ.get(EXEMPLAR_FILTER_ENV) else AlwaysOffExemplarFilter()
    meter_provider = MeterProvider(
        metric_readers=readers, resource=resource, exemplar_filter=exemplars
    )
    tracer = tracer_provider.get_tracer("ztbank")
    meter = meter_provider.get_meter("ztbank")

    if svid is not None:
        _svid_gauges(meter, svid)

    if revocation is not None:
        _revocation_gauges(meter, revocation)

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

    decisions = DecisionCounts()
    meter.create_observable_counter(
        "authz.decisions",
        [decisions.observe],
        description="authorization decisions by service and outcome",
    )
    return Telemetry(
        tracer=tracer,
        meter=meter,
        handshake_duration=meter.create_histogram(
            "tls.handshake.duration",
            unit="s",
            description="TLS handshake time by role (client, server) and status (success, fail)",
        ),
        authz_decisions=decisions,
        transfer_duration=meter.create_histogram(
            "transfer.duration", unit="s", description="time to create a transfer"
        ),
        _shutdown=shutdown,
    )


def _svid_gauges(meter: Meter, current: Callable[[], SvidMaterial]) -> None:
    """The held SVID (a service serves and calls with the same one), labelled with its ID
    and serial so that a rotation shows as a new series."""

    def labels(material: SvidMaterial) -> dict[str, str]:
        return {"spiffe_id": str(material.spiffe_id), "serial": material.serial}

    def observe_expiry(_: CallbackOptions) -> Iterable[Observation]:
        material = current()
        yield Observation(material.seconds_left(), labels(material))

    def observe_valid(_: CallbackOptions) -> Iterable[Observation]:
        material = current()
        yield Observation(1 if material.seconds_left() > 0 else 0, labels(material))

    def observe_lifetime(_: CallbackOptions) -> Iterable[Observation]:
        material = current()
        yield Observation(material.lifetime.total_seconds(), labels(material))

    meter.create_observable_gauge(
        "svid.expiry",
        [observe_expiry],
        unit="s",
        description="seconds until the held SVID expires",
    )
    meter.create_observable_gauge(
        "svid.valid",
        [observe_valid],
        description="1 while the held SVID is within its validity",
    )
    meter.create_observable_gauge(
        "svid.lifetime",
        [observe_lifetime],
        unit="s",
        description="the held SVID's whole validity period (notAfter - notBefore)",
    )


def record_handshake(
    telemetry: Telemetry, service: str, role: str, started: float, *, ok: bool
) -> None:
    """One TLS handshake of ``role`` (client, server) that began at ``started``
    (``time.perf_counter()``) and just ended."""
    telemetry.handshake_duration.record(
        time.perf_counter() - started,
        {"service": service, "role": role, "status": "success" if ok else "fail"},
    )


def _revocation_gauges(meter: Meter, revocation: RevocationStatus) -> None:
    status = revocation

    def observe_fresh(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(1 if status.fresh() else 0)

    def observe_age(_: CallbackOptions) -> Iterable[Observation]:
        age = status.age_seconds()
        if age is not None:
            yield Observation(age)

    def observe_revoked(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(len(status.revoked_serials()))

    meter.create_observable_gauge(
        "revocation.fresh",
        [observe_fresh],
        description="1 while every CRL held is fresh; 0 means new connections are refused",
    )
    meter.create_observable_gauge(
        "revocation.age",
        [observe_age],
        unit="s",
        description="seconds since the stalest CRL was last fetched from the issuer",
    )
    meter.create_observable_gauge(
        "revocation.revoked",
        [observe_revoked],
        description="certificate serials the current CRLs list as revoked",
    )


def inject_context() -> list[tuple[str, str]]:
    """W3C trace context of the current span as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def extract_context(pairs: Iterable[tuple[str, str | bytes]] | Mapping[str, str]) -> Context:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    carrier = {k.lower(): v for k, v in items if isinstance(v, str)}
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
