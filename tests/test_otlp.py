"""The OTLP span encoder of busagents writes the request the library's own encoder writes."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from busagents._otlp import FastOTLPSpanExporter, encode_spans


def spans_of_every_shape() -> list[ReadableSpan]:
    exporter = InMemorySpanExporter()
    providers = [
        TracerProvider(resource=Resource.create({"service.name": name, "service.namespace": "swarm"}))
        for name in ("flight-monitor", "flight-context")
    ]
    for provider in providers:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    monitor = providers[0].get_tracer("busagents", "1.0")
    context = providers[1].get_tracer("busagents", "1.0", schema_url="https://opentelemetry.io/schemas/1.21.0")
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    with monitor.start_as_current_span(
        "process travel.flight.status.*",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.message.body.size": 412,
            "negative": -7,
            "ratio": 0.25,
            "flag": True,
            "off": False,
            "ids": ["a", "b"],
            "numbers": [1, 2, 3],
            "unicode": "Zürich ✈",
        },
    ) as span:
        span.add_event("checked", {"flights": 3})
        with monitor.start_as_current_span("publish travel.flight.delayed.*", kind=SpanKind.PRODUCER) as child:
            child.set_status(Status(StatusCode.ERROR, "no stream"))
        try:
            with context.start_as_current_span("process travel.context.bookings", kind=SpanKind.SERVER):
                raise ValueError("boom")
        except ValueError:
            pass
    with context.start_as_current_span("linked", links=[Link(remote, {"why": "batch"})]) as linked:
        linked.set_status(Status(StatusCode.OK))
    spans = list(exporter.get_finished_spans())
    assert len(spans) == 4
    return spans


def as_dict(data: bytes) -> dict[str, Any]:
    request = ExportTraceServiceRequest.FromString(data)
    for resource_spans in request.resource_spans:  # the order of the groups is not part of the format
        for scope_spans in resource_spans.scope_spans:
            scope_spans.spans.sort(key=lambda s: s.span_id)
    resources = sorted(request.resource_spans, key=lambda r: r.SerializeToString(deterministic=True))
    decoded: dict[str, Any] = MessageToDict(ExportTraceServiceRequest(resource_spans=resources))
    return decoded


def test_our_encoding_decodes_to_the_librarys_request() -> None:
    spans = spans_of_every_shape()
    ours = encode_spans(spans)
    theirs = library_encode_spans(spans).SerializeToString()
    assert as_dict(ours) == as_dict(theirs)
    assert len(ours) == len(theirs)


def test_the_exporter_keeps_the_library_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3")
    exporter = FastOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert exporter.fast  # this release of the exporter has the client the fast path sends with
    exporter.shutdown()  # type: ignore[no-untyped-call]
