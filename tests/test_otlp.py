"""The OTLP span encoder of busagents writes the request the library's own encoder writes."""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
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

from busagents._otlp import (
    EncodingSpanProcessor,
    FastOTLPSpanExporter,
    RecordedSpan,
    SpanRecorder,
    UnsampledSpan,
    _Encoder,
    _StdlibTransport,
    assemble,
    encode_spans,
)
from busagents.telemetry import _span_context, _traceparent
from busagents.testing import OtlpReceiver


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


class _Captured:
    """What a SpanRecorder needs of its EncodingSpanProcessor, keeping what it is given."""

    def __init__(self) -> None:
        self.encoder = _Encoder()
        self.items: list[tuple[bytes, bytes, bytes]] = []

    def enqueue(self, encoded: tuple[bytes, bytes, bytes]) -> None:
        self.items.append(encoded)


def _span_of(data: bytes) -> dict[str, Any]:
    (resource_spans,) = as_dict(data)["resourceSpans"]
    (scope_spans,) = resource_spans["scopeSpans"]
    (span,) = scope_spans["spans"]
    span["attributes"] = sorted(span.get("attributes", []), key=lambda a: a["key"])
    return {"resource": resource_spans["resource"], "scope": scope_spans["scope"], "span": span}


REMOTE = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True, trace_flags=TraceFlags(1))


def _sdk_and_recorder() -> tuple[InMemorySpanExporter, Any, _Captured, SpanRecorder]:
    """The SDK's spans of ``flight-notifier`` kept in memory, and a recorder on the same tracer."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "flight-notifier"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("busagents", "1.0")
    captured = _Captured()
    recorder = SpanRecorder(
        cast(EncodingSpanProcessor, captured), cast(SdkTracer, tracer), InstrumentationScope("busagents", "1.0")
    )
    return exporter, tracer, captured, recorder


def test_a_recorded_message_span_exports_what_the_sdk_span_would() -> None:
    exporter, tracer, captured, recorder = _sdk_and_recorder()
    remote = REMOTE
    fixed = {"messaging.system": "nats", "busagents.agent": "flight-notifier", "messaging.operation.type": "process"}
    own = {"messaging.destination.name": "travel.flight.rebooked.F1", "messaging.message.id": "m1"}
    try:
        raise ValueError("no seat")
    except ValueError as exc:
        error = exc

    recorded = recorder.start(
        "process travel.flight.rebooked.*",
        SpanKind.CONSUMER,
        remote,
        recorder.fixed(fixed),
        dict(own),
        parent_based=True,
    )
    assert isinstance(recorded, RecordedSpan) and recorded.is_recording()
    assert recorded.get_span_context().trace_id == remote.trace_id and recorded.get_span_context().trace_flags.sampled
    recorded.set_own("busagents.outcome", "handled")
    recorded.set_attribute("handler.note", "set by the handler")
    recorded.set_attribute("messaging.message.id", "m2")  # the handler's value wins
    recorded.add_event("checked", {"seats": 3})
    recorded.record_exception(error)
    recorded.set_status(Status(StatusCode.ERROR, "ValueError: no seat"))
    recorded.end()
    recorded.set_attribute("late", True)  # after the end: ignored, as by the SDK

    sdk = tracer.start_span(
        "process travel.flight.rebooked.*",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.CONSUMER,
        attributes={**fixed, **own},
    )
    sdk.set_attribute("busagents.outcome", "handled")
    sdk.set_attribute("handler.note", "set by the handler")
    sdk.set_attribute("messaging.message.id", "m2")
    sdk.add_event("checked", {"seats": 3})
    sdk.record_exception(error)
    sdk.set_status(Status(StatusCode.ERROR, "ValueError: no seat"))
    sdk.end()

    (item,) = captured.items
    ours = _span_of(assemble([item]))
    (finished,) = exporter.get_finished_spans()
    theirs = _span_of(library_encode_spans([finished]).SerializeToString())
    for key in ("spanId", "startTimeUnixNano", "endTimeUnixNano"):  # its own id and clock readings
        ours["span"][key] = theirs["span"][key]
    for event, their_event in zip(ours["span"]["events"], theirs["span"]["events"], strict=True):
        event["timeUnixNano"] = their_event["timeUnixNano"]
    assert ours == theirs


@pytest.mark.parametrize("parent", ["remote", "root"])
def test_a_plain_recorded_span_exports_what_the_sdk_span_would(parent: str) -> None:
    exporter, tracer, captured, recorder = _sdk_and_recorder()
    remote = REMOTE
    fixed = {"messaging.system": "nats", "busagents.agent": "flight-notifier"}
    own = {"messaging.destination.name": "travel.passenger.notified.P1", "messaging.message.id": "m" * 60}
    recorded = recorder.start(
        "publish travel.passenger.notified.*",
        SpanKind.PRODUCER,
        remote if parent == "remote" else None,
        recorder.fixed(fixed),
        dict(own),
        parent_based=True,
    )
    recorded.end()
    sdk = tracer.start_span(
        "publish travel.passenger.notified.*",
        context=set_span_in_context(NonRecordingSpan(remote)) if parent == "remote" else None,
        kind=SpanKind.PRODUCER,
        attributes={**fixed, **own},
    )
    sdk.end()
    (item,) = captured.items
    ours = _span_of(assemble([item]))
    (finished,) = exporter.get_finished_spans()
    theirs = _span_of(library_encode_spans([finished]).SerializeToString())
    for key in ("traceId", "spanId", "startTimeUnixNano", "endTimeUnixNano"):
        assert key in ours["span"]
        ours["span"][key] = theirs["span"][key]
    assert ours == theirs


def test_a_recorded_span_asks_the_sampler_unless_its_parent_was_sampled() -> None:
    captured = _Captured()
    tracer = TracerProvider(sampler=ParentBased(ALWAYS_OFF)).get_tracer("busagents", "1.0")
    recorder = SpanRecorder(
        cast(EncodingSpanProcessor, captured), cast(SdkTracer, tracer), InstrumentationScope("busagents")
    )
    fixed = recorder.fixed({"messaging.system": "nats"})
    root = recorder.start("publish a", SpanKind.PRODUCER, None, fixed, {}, parent_based=True)
    assert (
        not root.is_recording() and not root.get_span_context().trace_flags.sampled and root.get_span_context().is_valid
    )
    root.end()
    sampled = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(1))
    child = recorder.start("process a", SpanKind.CONSUMER, sampled, fixed, {}, parent_based=True)
    assert child.is_recording() and child.get_span_context().trace_flags.sampled
    child.end()
    assert len(captured.items) == 1  # only the sampled span is exported


@pytest.mark.parametrize(
    ("sampler", "keeps_some"),
    [
        (ParentBasedTraceIdRatio(0.3), True),
        (TraceIdRatioBased(0.3), True),
        (ParentBased(TraceIdRatioBased(0.7)), True),
        (ParentBased(ALWAYS_OFF), False),
    ],
    ids=["parentbased_traceidratio", "traceidratio", "parentbased-ratio", "parentbased_always_off"],
)
def test_a_root_is_kept_or_dropped_as_the_standard_sampler_decides(sampler: Sampler, keeps_some: bool) -> None:
    """The ratio samplers' root decision, made without asking them, is theirs for every trace id."""
    captured = _Captured()
    tracer = TracerProvider(sampler=sampler).get_tracer("busagents", "1.0")
    recorder = SpanRecorder(
        cast(EncodingSpanProcessor, captured), cast(SdkTracer, tracer), InstrumentationScope("busagents")
    )
    fixed = recorder.fixed({"messaging.system": "nats"})
    shape = recorder.shape("publish a", SpanKind.PRODUCER)
    kept = 0
    for _ in range(2000):
        root = recorder.root(shape, fixed, {})
        context = root.get_span_context()
        keep = sampler.should_sample(None, context.trace_id, "publish a", SpanKind.PRODUCER).decision
        assert isinstance(root, RecordedSpan) is (keep is Decision.RECORD_AND_SAMPLE)
        assert context.is_valid and not context.is_remote
        assert context.trace_flags.sampled is (keep is Decision.RECORD_AND_SAMPLE)
        if keep is Decision.DROP:  # what its conversation carries: its ids, not sampled
            assert isinstance(root, UnsampledSpan) and not root.is_recording()
            assert root.traceparent() == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        kept += keep is Decision.RECORD_AND_SAMPLE
        root.end()
    assert len(captured.items) == kept  # the kept roots, and only they, are exported
    assert (0 < kept < 2000) if keeps_some else kept == 0


def test_a_plain_http_endpoint_is_posted_to_with_the_standard_library(monkeypatch: pytest.MonkeyPatch) -> None:
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    spans = spans_of_every_shape()
    with OtlpReceiver() as receiver:
        exporter = FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
        assert isinstance(exporter._client._transport, _StdlibTransport)
        assert exporter.export_encoded(encode_spans(spans)) and exporter.export_encoded(encode_spans(spans[:1]))
        exporter.shutdown()  # type: ignore[no-untyped-call]
        assert receiver.requests == 2
        assert receiver.connections == 1  # kept alive from one export to the next
        assert sorted(s.name for s in receiver.snapshot()) == sorted([s.name for s in spans] + [spans[0].name])
    closed = FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces", timeout=0.5)  # nobody listens now
    assert not closed.export_encoded(encode_spans(spans))  # the library's retries, then given up
    closed.shutdown()  # type: ignore[no-untyped-call]
    secure = FastOTLPSpanExporter(endpoint="https://127.0.0.1:9/v1/traces")
    assert not isinstance(secure._client._transport, _StdlibTransport)  # TLS stays with the library's transport
    secure.shutdown()  # type: ignore[no-untyped-call]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    proxied = FastOTLPSpanExporter(endpoint="http://collector.example:4318/v1/traces")
    assert not isinstance(proxied._client._transport, _StdlibTransport)  # and so does a proxied one
    proxied.shutdown()  # type: ignore[no-untyped-call]


TRACE, SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            (TRACE, SPAN, 1),
        ),
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03",
            (TRACE, SPAN, 1),
        ),
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            (TRACE, SPAN, 0),
        ),
        ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", None),  # version ff is invalid
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", None),  # no trace id
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", None),  # no span id
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x", None),
        ("00-0af7651916cd43dd8448eb211c80319cXb7ad6b7169203331-01", None),
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", None),
        ("not a traceparent", None),
    ],
)
def test_a_senders_traceparent_is_read_or_refused(value: str, expected: tuple[int, int, int] | None) -> None:
    sender = _traceparent({"traceparent": value})
    assert (sender[:3] if sender else None) == expected
    if sender is not None:
        assert sender[3] is None  # no tracestate header
        context = _span_context(sender)
        assert expected is not None and context.is_remote
        assert (context.trace_id, context.span_id, context.trace_flags.sampled) == (*expected[:2], bool(expected[2]))
    with_state = _traceparent({"traceparent": value, "tracestate": "vendor=abc"})
    assert (with_state is None) == (expected is None)
    assert with_state is None or (with_state[3] is not None and with_state[3].get("vendor") == "abc")
