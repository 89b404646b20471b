"""Adapter to the OTLP/HTTP span exporter of ``opentelemetry-exporter-otlp-proto-http``: a faster encoder.

The exporter's own encoder builds a protobuf object per span, attribute and value (about
100 µs a span under load, in the export thread, holding the GIL the event loop needs); here
the spans are written to the same ``ExportTraceServiceRequest`` wire bytes directly, keys,
names, resources and scopes encoded once and kept. The exporter's private ``_client`` (1.39
and later) sends them; with another release the library's own ``export`` runs unchanged.
busagents' own message spans (publish, process) skip the SDK's span altogether when this
processor is the only one (:class:`SpanRecorder`): what they share is encoded once.
tests/test_otlp.py checks the bytes decode to the same request the library's encoder makes,
and that a recorded span exports what the SDK's span would.
"""

from __future__ import annotations

import http.client
import logging
import os
import struct
import threading
import time
import traceback
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import (
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER,
    _OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER,
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AttributeValue

__all__ = [
    "EncodingSpanProcessor",
    "FastOTLPSpanExporter",
    "FixedAttributes",
    "RecordedSpan",
    "Shape",
    "SpanRecorder",
    "UnsampledSpan",
    "encode_spans",
]

log = logging.getLogger("busagents.telemetry")

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_MAX_CACHED = 4096  # keys and names kept encoded: the spans' vocabulary is small
_SHORT = 64  # string attribute values shorter than this (bytes) are written with a kept prefix
_KINDS = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}


_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _value(value: Any) -> bytes:
    """An AnyValue message."""
    if isinstance(value, str):
        return _field(1, value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Mapping):
        return _field(
            6, b"".join(_field(1, _field(1, str(k).encode()) + _field(2, _value(v))) for k, v in value.items())
        )
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _value(v)) for v in value))
    if value is None:
        return b""
    raise TypeError(f"cannot encode an attribute value of type {type(value).__name__}")


#: A plain recorded span as :class:`SpanRecorder` queues it: trace id, span id, parent span id (0: a
#: root), parent is remote, encoded name and kind, start, end, encoded fixed attributes, own attributes.
_Plain = tuple[int, int, int, bool, bytes, int, int, bytes, dict[str, Any]]
#: A span's (resource, scope, span) bytes; the first two are shared by every span of that resource and
#: scope; the span is encoded (a ``ResourceSpans.scope_spans.spans`` field) or still plain.
_Encoded = tuple[bytes, bytes, "bytes | _Plain"]


def assemble(encoded: Sequence[_Encoded]) -> bytes:
    """The ``ExportTraceServiceRequest`` of spans queued one by one: grouped by resource, then by scope."""
    grouped: dict[int, tuple[bytes, dict[int, tuple[bytes, list[bytes]]]]] = {}
    for resource_part, scope_part, span in encoded:
        resource = grouped.get(id(resource_part))
        if resource is None:
            resource = grouped[id(resource_part)] = (resource_part, {})
        scope = resource[1].get(id(scope_part))
        if scope is None:
            scope = resource[1][id(scope_part)] = (scope_part, [])
        scope[1].append(span if type(span) is bytes else _plain_span(span))  # type: ignore[arg-type]
    out = []
    for resource_part, scopes in grouped.values():
        scope_spans = b"".join(_field(2, scope_part + b"".join(spans)) for scope_part, spans in scopes.values())
        out.append(_field(1, resource_part + scope_spans))
    return b"".join(out)


_IDS = struct.Struct(">HQQHQ").pack  # trace id (two halves) and span id, with their tags
_TIMES = struct.Struct("<BQBQ").pack  # start and end, with their tags
_LOW64 = (1 << 64) - 1


def _plain_span(plain: _Plain) -> bytes:
    """A plain span's ``spans`` field: what the SDK's span with the same values encodes to."""
    trace_id, span_id, parent_id, remote, shape, start, end, fixed, attributes = plain
    body = b"".join(
        (
            _IDS(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span_id),
            b"\x22\x08" + parent_id.to_bytes(8, "big") if parent_id else b"",
            shape,
            _TIMES(0x39, start, 0x41, end),
            fixed,
            _PLAIN.attributes(attributes),
            b"\x7a\x00",  # an empty Status
            _FLAGS_REMOTE if remote else _FLAGS_LOCAL,
        )
    )
    return _field(2, body)


class _Encoder:
    """Keeps what repeats from span to span encoded: attribute keys, span names, resources, scopes."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._names: dict[str, bytes] = {}
        self._prefixes: dict[str, list[bytes | None]] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}
        #: One bytes object per distinct resource or scope encoding: spans of equal resources (an SDK
        #: span and a recorded one of the same agent) share it, so assemble() groups them together.
        self._canonical: dict[bytes, bytes] = {}

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """``spans`` as the bytes of one ``ExportTraceServiceRequest``."""
        return assemble([self.encode(span) for span in spans])

    def encode(self, span: ReadableSpan) -> _Encoded:
        """One span's bytes, with those of its resource and scope (kept: the same objects every time)."""
        resource_part, scope_part = self._remember(span.resource, span.instrumentation_scope)
        return resource_part, scope_part, _field(2, self._span(span))

    def parts(self, resource: Resource, scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
        """The encoded resource and scope of a span (the objects :func:`assemble` groups by)."""
        return self._remember(resource, scope)

    def _remember(self, resource: Resource, scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            self._trim(self._resources)
            encoded = _field(1, self._attributes(resource.attributes))
            if resource.schema_url:
                encoded += _field(3, resource.schema_url.encode())
            known = self._resources[id(resource)] = (resource, self._canonical_bytes(encoded))
        known_scope = self._scopes.get(id(scope))
        if known_scope is None or known_scope[0] is not scope:
            self._trim(self._scopes)
            encoded = b""
            if scope is not None:
                encoded = _field(1, scope.name.encode())
                if scope.version:
                    encoded += _field(2, scope.version.encode())
                encoded += self._attributes(scope.attributes, 3)
                encoded = _field(1, encoded)
                if scope.schema_url:
                    encoded += _field(3, scope.schema_url.encode())
            known_scope = self._scopes[id(scope)] = (scope, self._canonical_bytes(encoded))
        return known[1], known_scope[1]

    def _canonical_bytes(self, encoded: bytes) -> bytes:
        self._trim(self._canonical)
        return self._canonical.setdefault(encoded, encoded)

    @staticmethod
    def _trim(cache: dict[Any, Any]) -> None:
        if len(cache) >= _MAX_CACHED:
            cache.clear()

    def attributes(self, attributes: Mapping[str, Any] | None) -> bytes:
        """A span's attributes (repeated field 9).

        A short string value (the common case: a subject, an id) is written as its key's prefix
        for that length, kept from one span to the next, and the string itself.
        """
        if not attributes:
            return b""
        prefixes = self._prefixes
        parts: list[bytes] = []
        for key, value in attributes.items():
            if type(value) is str:
                raw = value.encode()
                n = len(raw)
                if n < _SHORT:
                    by_length = prefixes.get(key)
                    if by_length is None:
                        by_length = self._prefixes_of(key)
                    prefix = by_length[n]
                    if prefix is not None:
                        parts += (prefix, raw)
                        continue
            parts.append(self._attributes({key: value}, 9))
        return b"".join(parts)

    def _prefixes_of(self, key: str) -> list[bytes | None]:
        """What precedes a string value of each length under ``key`` in a span's attributes
        (None where the KeyValue would not fit a one-byte length)."""
        self._trim(self._prefixes)
        encoded_key = _field(1, key.encode())
        by_length: list[bytes | None] = []
        for n in range(_SHORT):
            size = len(encoded_key) + n + 4  # the key, then the value: AnyValue{string_value}
            fits = size < 0x80
            by_length.append(
                b"\x4a" + _BYTE[size] + encoded_key + b"\x12" + _BYTE[n + 2] + b"\x0a" + _BYTE[n] if fits else None
            )
        self._prefixes[key] = by_length
        return by_length

    def _attributes(self, attributes: Mapping[str, Any] | None, number: int = 1) -> bytes:
        """Repeated KeyValue field ``number`` (1 in a Resource, 9 in a Span...)."""
        if not attributes:
            return b""
        keys = self._keys
        tag = _varint(number << 3 | 2)
        parts: list[bytes] = []
        for key, value in attributes.items():
            encoded_key = keys.get(key)
            if encoded_key is None:
                self._trim(keys)
                encoded_key = keys[key] = _field(1, key.encode())
            if type(value) is str and len(value) < 40:  # the common case, inline: every length fits a byte
                raw = value.encode()
                n = len(raw)
                size = len(encoded_key) + n + 4
                if n < 40 and size < 0x80:
                    parts += (tag, _BYTE[size], encoded_key, b"\x12", _BYTE[n + 2], b"\x0a", _BYTE[n], raw)
                    continue
            try:
                kv = encoded_key + _field(2, _value(value))
            except TypeError as exc:
                log.warning("span attribute %s not exported: %s", key, exc)
                continue
            parts.append(tag + _varint(len(kv)) + kv)
        return b"".join(parts)

    def name(self, name: str) -> bytes:
        """A span's name field, encoded once."""
        encoded = self._names.get(name)
        if encoded is None:
            self._trim(self._names)
            encoded = self._names[name] = _field(5, name.encode())
        return encoded

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.context
        assert context is not None
        return self.span(
            context,
            span.parent,
            self.name(span.name),
            span.kind,
            span.start_time or 0,
            span.end_time or 0,
            self._attributes(span.attributes, 9),
            span.dropped_attributes,
            span.events,
            span.dropped_events,
            span.links,
            span.dropped_links,
            span.status,
        )

    def span(
        self,
        context: SpanContext,
        parent: SpanContext | None,
        name: bytes,
        kind: SpanKind,
        start: int,
        end: int,
        attributes: bytes,
        dropped_attributes: int,
        events: Sequence[Event],
        dropped_events: int,
        links: Sequence[Link],
        dropped_links: int,
        status: Status,
    ) -> bytes:
        """One ``Span`` message (``name`` from :meth:`name`, ``attributes`` as repeated field 9)."""
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        if context.trace_state:
            parts.append(_field(3, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        parts += (
            name,
            _KINDS[kind],
            b"\x39" + _fixed64(start),
            b"\x41" + _fixed64(end),
            attributes,
        )
        if dropped_attributes:
            parts.append(b"\x50" + _varint(dropped_attributes))
        for event in events:
            encoded = b"\x09" + _fixed64(event.timestamp) + _field(2, event.name.encode())
            encoded += self._attributes(event.attributes, 3)
            parts.append(_field(11, encoded))
        if dropped_events:
            parts.append(b"\x60" + _varint(dropped_events))
        for link in links:
            encoded = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            encoded += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            encoded += self._attributes(link.attributes, 4) + b"\x35" + _fixed32(_flags(link.context))
            parts.append(_field(13, encoded))
        if dropped_links:
            parts.append(b"\x70" + _varint(dropped_links))
        encoded = _field(2, status.description.encode()) if status.description else b""
        if status.status_code.value:
            encoded += b"\x18" + _varint(status.status_code.value)
        parts.append(_field(15, encoded))
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return b"".join(parts)


def _flags(parent: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE


_FLAGS_LOCAL = b"\x85\x01" + _fixed32(_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)


_PLAIN = _Encoder()  # encodes the attributes of plain spans (in the export thread)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as the bytes of one ``ExportTraceServiceRequest``."""
    return _Encoder().request(spans)


@dataclass(frozen=True, slots=True)
class _Response(BaseHTTPResult):
    body: bytes = b""
    fields: Mapping[str, str] = dataclass_field(default_factory=dict)

    def content(self) -> bytes:
        return self.body

    def headers(self) -> Mapping[str, str]:
        return self.fields


class _StdlibTransport(BaseHTTPTransport):
    """POSTs over ``http.client`` on one kept-alive connection: the library's requests transport holds
    the GIL about three times as long a request (environment proxies, netrc, hooks, adapters), time the
    event loop of the process waits. Only for ``http://`` endpoints reached without a proxy; the
    library keeps compression, headers, retries and timeouts (it calls :meth:`request`)."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, int], http.client.HTTPConnection] = {}
        self._lock = threading.Lock()

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        parts = urlsplit(url)
        where = (parts.hostname or "localhost", parts.port or 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        with self._lock:
            connection = self._connections.get(where)
            if connection is None:
                connection = self._connections[where] = http.client.HTTPConnection(*where, timeout=timeout)
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            try:
                connection.request(method, target, body=data, headers=headers or {})
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                return _Response(error=exc)
            if response.will_close:
                connection.close()
            fields = {name.lower(): value for name, value in response.getheaders()}
            return _Response(status_code=response.status, reason=response.reason, body=body, fields=fields)

    def is_connection_error(self, exception: Exception | None) -> bool:
        return isinstance(exception, (OSError, http.client.HTTPException))

    def close(self) -> None:
        with self._lock:
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()


def _plain_http_endpoint(endpoint: str | None) -> bool:
    """The span endpoint (as the library resolves it) is ``http://`` and reached without a proxy."""
    endpoint = (
        endpoint
        or os.environ.get(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT)
        or (os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT) or "http://localhost:4318/").removesuffix("/") + "/v1/traces"
    )
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    return not (proxies.get("http") or proxies.get("all")) or bool(urllib.request.proxy_bypass(parts.hostname))


#: Keyword arguments that leave the wire to the transport: anything else (a session, certificates)
#: keeps the library's requests transport.
_PLAIN_ARGUMENTS = {"endpoint", "headers", "timeout", "compression", "max_request_size", "meter_provider"}


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/HTTP span exporter (same variables, retries and limits), with the faster encoder, and
    the standard library's HTTP client for a plain ``http://`` endpoint (:class:`_StdlibTransport`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plain = (
            not args
            and set(kwargs) <= _PLAIN_ARGUMENTS
            and not os.environ.get(_OTEL_PYTHON_EXPORTER_OTLP_HTTP_CREDENTIAL_PROVIDER)
            and not os.environ.get(_OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER)
            and _plain_http_endpoint(kwargs.get("endpoint"))
        )
        if plain:
            kwargs["_transport"] = _StdlibTransport()
        super().__init__(*args, **kwargs)
        self._encoder = _Encoder()
        #: This release of the library has the client the fast path sends with.
        self.fast = callable(getattr(getattr(self, "_client", None), "export", None))

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.fast or self._shutdown:
            return super().export(spans)
        try:
            data = self._encoder.request(spans)
        except Exception:  # an encoder bug must not lose the batch: the library encodes it
            log.exception("busagents' OTLP encoder failed; exporting with the library's")
            return super().export(spans)
        return SpanExportResult.SUCCESS if self.export_encoded(data) else SpanExportResult.FAILURE

    def export_encoded(self, data: bytes) -> bool:
        """Send one encoded ``ExportTraceServiceRequest`` (the library's retries and timeout); True when taken."""
        if self._shutdown:
            return False
        return bool(self._client.export(data).success)


class EncodingSpanProcessor(SpanProcessor):
    """Encodes each sampled span as it ends, and exports the bytes in batches from a thread of its own.

    What waits for the export is bytes, not span objects: nothing for the garbage collector to
    traverse and promote (in a process with a large heap, every span kept alive until its batch
    left was promoted and paid for in full collections), and the export thread holds the GIL only
    to join bytes, not to encode, so the event loop does not wait behind it.
    """

    def __init__(
        self,
        exporter: FastOTLPSpanExporter,
        *,
        max_queue_size: int = 65536,
        schedule_delay_millis: float = 1000,
        max_export_batch_size: int = 2048,
    ) -> None:
        self._exporter = exporter
        self._encoder = _Encoder()
        self._queue: deque[_Encoded] = deque()
        self._max_queue = max_queue_size
        self._delay = schedule_delay_millis / 1000
        self._batch = max(1, max_export_batch_size)
        self._wake = threading.Event()
        self._woken = False  # the export thread was woken for a full batch and has not started it
        self._exporting = threading.Lock()
        self._done = False
        #: Spans dropped because the queue was full (the collector too slow or down).
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="busagents-otlp-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    @property
    def encoder(self) -> _Encoder:
        return self._encoder

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if self._done or context is None or not context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self._drop()
            return
        try:
            encoded = self._encoder.encode(span)
        except Exception:  # a span that does not encode is lost alone, with a trace of why
            log.exception("busagents could not encode span %r for OTLP", span.name)
            return
        self.enqueue(encoded)

    def enqueue(self, encoded: _Encoded) -> None:
        """Queue one encoded span (a :class:`SpanRecorder`'s, or one :meth:`on_end` encoded) for export."""
        if self._done:
            return
        if len(self._queue) >= self._max_queue:
            self._drop()
            return
        queue = self._queue
        queue.append(encoded)
        if len(queue) >= self._batch and not self._woken:  # once: the export thread takes them all
            self._woken = True
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
            log.warning("span export queue full (%d spans): %d spans dropped so far", self._max_queue, self.dropped)

    def _run(self) -> None:
        while not self._done:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._woken = False
            self._export_queued()

    def _export_queued(self) -> bool:
        ok = True
        with self._exporting:
            while self._queue:
                count = min(self._batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(count)]
                ok = self._exporter.export_encoded(assemble(batch)) and ok
        return ok

    def shutdown(self) -> None:
        if self._done:
            return
        self._done = True
        self._wake.set()
        self._thread.join(30)
        self._export_queued()
        self._exporter.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._export_queued()


class SpanRecorder:
    """Starts busagents' own message spans (publish, process) of one tracer and queues them for an
    :class:`EncodingSpanProcessor` when they end.

    What the SDK does for a span (sampler, ids, limits, a lock, attribute checks, a ReadableSpan
    copy at the end, then encoding) costs about 50 µs; most of it is the same from one message to
    the next, so here the fixed attributes, name, kind, resource and scope are encoded once and a
    span costs its ids, clock readings and few varying attributes. Only for a tracer whose
    provider's one processor is the EncodingSpanProcessor (no other processor sees these spans).
    The sampler is the provider's: a parent-based one keeps a sampled parent's child without asking.

    A plain span (busagents' attributes only, no event, link, status or trace state: nearly all of
    them) is queued as a tuple of plain values (:data:`_Plain`), which the export thread encodes:
    the event loop pays for a tuple, and the tuple holds no object for the garbage collector.
    """

    def __init__(self, processor: EncodingSpanProcessor, tracer: SdkTracer, scope: InstrumentationScope) -> None:
        self._processor = processor
        self._encoder = processor.encoder
        self.sampler = tracer.sampler
        self._ids = tracer.id_generator
        self._new_span_id = tracer.id_generator.generate_span_id
        self._random = tracer.id_generator.is_trace_id_random()
        self.limits = SpanLimits()
        self._resource_part, self._scope_part = self._encoder.parts(tracer.resource, scope)
        self._shapes: dict[tuple[str, SpanKind], Shape] = {}
        #: The SDK's default sampler (parentbased_always_on) or always_on: a root is always kept,
        #: so it is kept here without asking (the sampler would return no attributes, no trace state).
        self._keeps_roots = self.sampler is DEFAULT_ON or self.sampler is ALWAYS_ON
        #: The standard ratio samplers (``traceidratio``, ``parentbased_traceidratio``, ``parentbased_always_off``):
        #: a root is kept when the low 64 bits of its trace id are under this bound, decided here as the
        #: sampler decides it (the sampler's own call makes a result object and reads the context twice).
        self._root_bound = _root_bound(self.sampler)

    def fixed(self, attributes: Mapping[str, AttributeValue]) -> FixedAttributes:
        """Attributes every span of a kind carries, encoded once for all of them."""
        return FixedAttributes(dict(attributes), self._encoder.attributes(attributes))

    def shape(self, name: str, kind: SpanKind) -> Shape:
        """A span name and kind, encoded once (kept: the spans' vocabulary is small)."""
        key = (name, kind)
        found = self._shapes.get(key)
        if found is None:
            if len(self._shapes) >= _MAX_CACHED:
                self._shapes.clear()
            found = self._shapes[key] = Shape(name, kind, self._encoder)
        return found

    def start(
        self,
        name: str,
        kind: SpanKind,
        parent: SpanContext | None,
        fixed: FixedAttributes,
        attributes: dict[str, AttributeValue],
        *,
        parent_based: bool = False,
    ) -> RecordedSpan | NonRecordingSpan:
        """A recording span, child of ``parent`` (None or invalid: a root); a NonRecordingSpan if the sampler drops it.

        ``attributes``: valid attribute values (not checked), this span's own; ``parent_based``:
        the sampler keeps the child of a sampled parent (the standard ``parentbased_*`` ones do),
        so it is not asked.
        """
        shape = self.shape(name, kind)
        if parent is not None and parent.is_valid:
            return self.child(
                shape,
                parent.trace_id,
                parent.span_id,
                parent.trace_flags,
                parent.trace_state,
                parent.is_remote,
                fixed,
                attributes,
                parent_based=parent_based,
            )
        return self.root(shape, fixed, attributes)

    def child(
        self,
        shape: Shape,
        trace_id: int,
        parent_id: int,
        flags: int,
        trace_state: TraceState | None,
        remote: bool,
        fixed: FixedAttributes,
        attributes: dict[str, AttributeValue],
        *,
        parent_based: bool = False,
    ) -> RecordedSpan | NonRecordingSpan:
        """:meth:`start` with the parent given by its ids (``flags``: its trace flags), no SpanContext made."""
        if parent_based and flags & _SAMPLED:  # what a parent-based sampler decides
            return RecordedSpan(
                self,
                shape,
                trace_id,
                self._new_span_id(),
                (flags & _RANDOM) | _SAMPLED,
                trace_state,
                parent_id,
                remote,
                fixed,
                attributes,
                None,
            )
        parent = SpanContext(
            trace_id, parent_id, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=trace_state
        )
        return self._sampled(shape, trace_id, flags & _RANDOM, parent, fixed, attributes)

    def root(
        self, shape: Shape, fixed: FixedAttributes, attributes: dict[str, AttributeValue]
    ) -> RecordedSpan | NonRecordingSpan:
        """The first span of a new trace, if the sampler keeps it."""
        flags = _RANDOM if self._random else 0
        trace_id = self._ids.generate_trace_id()
        bound = self._root_bound
        if self._keeps_roots or (bound is not None and trace_id & _LOW64 < bound):
            return RecordedSpan(
                self, shape, trace_id, self._new_span_id(), flags | _SAMPLED, None, 0, False, fixed, attributes, None
            )
        if bound is not None:  # dropped, as the sampler would have
            return UnsampledSpan(trace_id, self._new_span_id(), flags)
        return self._sampled(shape, trace_id, flags, None, fixed, attributes)

    def _sampled(
        self,
        shape: Shape,
        trace_id: int,
        flags: int,
        parent: SpanContext | None,
        fixed: FixedAttributes,
        attributes: dict[str, AttributeValue],
    ) -> RecordedSpan | NonRecordingSpan:
        context = None if parent is None else trace.set_span_in_context(NonRecordingSpan(parent))
        result = self.sampler.should_sample(context, trace_id, shape.name, shape.kind, None, ())
        if result.decision is Decision.RECORD_AND_SAMPLE:
            flags |= _SAMPLED
        span_id = self._new_span_id()
        if result.decision is Decision.DROP:
            return NonRecordingSpan(
                SpanContext(
                    trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags), trace_state=result.trace_state
                )
            )
        return RecordedSpan(
            self,
            shape,
            trace_id,
            span_id,
            flags,
            result.trace_state,
            0 if parent is None else parent.span_id,
            parent is not None and parent.is_remote,
            fixed,
            attributes,
            result.attributes,
        )

    def _finish(self, span: RecordedSpan) -> None:
        """Queue an ended span for export (a span that is recorded but not sampled is not exported)."""
        if not span._flags & _SAMPLED:
            return
        user = span._user
        parent_id = span._parent_id
        if (
            user is None
            and span._events is None
            and span._links is None
            and span._status is _UNSET
            and not span._trace_state
        ):  # plain: encoded by the export thread
            plain = (
                span._trace_id,
                span._span_id,
                parent_id,
                span._remote,
                span._shape.encoded,
                span._start,
                span._end or 0,
                span._fixed.encoded,
                span._attributes,
            )
            self._processor.enqueue((self._resource_part, self._scope_part, plain))
            return
        encoder = self._encoder
        try:
            if user is None:
                attributes = span._fixed.encoded + encoder.attributes(span._attributes)
                dropped = 0
            else:  # attributes the handler set: they win over ours of the same key
                attributes = encoder.attributes({**span._fixed.attributes, **span._attributes, **user})
                dropped = user.dropped
            events = span._events
            links = span._links
            parent = SpanContext(span._trace_id, parent_id, is_remote=span._remote) if parent_id else None
            encoded = encoder.span(
                span.get_span_context(),
                parent,
                span._shape.encoded_name,
                span._shape.kind,
                span._start,
                span._end or 0,
                attributes,
                dropped,
                () if events is None else events,
                0 if events is None else events.dropped,
                () if links is None else links,
                0 if links is None else links.dropped,
                span._status,
            )
        except Exception:  # a span that does not encode is lost alone, with a trace of why
            log.exception("busagents could not encode span %r for OTLP", span._shape.name)
            return
        self._processor.enqueue((self._resource_part, self._scope_part, _field(2, encoded)))


def _root_bound(sampler: Any) -> int | None:
    """The trace-id bound under which ``sampler`` keeps a root span, when it is one of the SDK's ratio
    samplers (or parent-based always-off); None for any other sampler (it is asked)."""
    parent_based = type(sampler) in (ParentBased, ParentBasedTraceIdRatio)
    root = sampler._root if parent_based else sampler
    if type(root) is TraceIdRatioBased:
        return int(root.bound)
    if root is ALWAYS_OFF and parent_based:
        return 0
    return None


class UnsampledSpan(NonRecordingSpan):
    """A root span the sampler dropped: its ids as integers, its SpanContext made only if asked for
    (its conversation carries ``traceparent`` with the sampled flag off, read by :meth:`traceparent`)."""

    __slots__ = ("_flags", "_span_id", "_trace_id")

    def __init__(self, trace_id: int, span_id: int, flags: int) -> None:
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags
        self._context = None  # type: ignore[assignment]  # made on first use

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self._trace_id, self._span_id, is_remote=False, trace_flags=TraceFlags(self._flags)
            )
        return context

    def traceparent(self) -> str:
        """This span's W3C ``traceparent`` header."""
        return "00-%032x-%016x-%02x" % (self._trace_id, self._span_id, self._flags)  # noqa: UP031 (faster)


class Shape:
    """A span's name and kind, and their encoding (fields 5 and 6 of a Span)."""

    __slots__ = ("encoded", "encoded_name", "kind", "name")

    def __init__(self, name: str, kind: SpanKind, encoder: _Encoder) -> None:
        self.name = name
        self.kind = kind
        self.encoded_name = encoder.name(name)
        self.encoded = self.encoded_name + _KINDS[kind]


class FixedAttributes:
    """Attributes shared by many spans, with their encoding (:meth:`SpanRecorder.fixed`)."""

    __slots__ = ("attributes", "encoded")

    def __init__(self, attributes: dict[str, AttributeValue], encoded: bytes) -> None:
        self.attributes = attributes
        self.encoded = encoded


_UNSET = Status(StatusCode.UNSET)
_SAMPLED = int(TraceFlags.SAMPLED)
_RANDOM = int(TraceFlags.RANDOM_TRACE_ID)


class RecordedSpan(trace.Span):
    """A span of :class:`SpanRecorder`: the OpenTelemetry Span API, with the SDK span's limits and
    semantics (status, exceptions as events, events and links), queued for export when it ends.

    Its ids are kept as integers; the SpanContext is made when first asked for (busagents' own
    spans read the integers). Like the spans busagents makes it lives in one thread (the event
    loop's); it takes no lock.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_end",
        "_events",
        "_fixed",
        "_flags",
        "_links",
        "_parent_id",
        "_recorder",
        "_remote",
        "_shape",
        "_span_id",
        "_start",
        "_status",
        "_trace_id",
        "_trace_state",
        "_user",
    )

    def __init__(
        self,
        recorder: SpanRecorder,
        shape: Shape,
        trace_id: int,
        span_id: int,
        flags: int,
        trace_state: TraceState | None,
        parent_id: int,
        remote: bool,
        fixed: FixedAttributes,
        attributes: dict[str, AttributeValue],
        sampler_attributes: Mapping[str, AttributeValue] | None,
    ) -> None:
        self._recorder = recorder
        self._shape = shape
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags
        self._trace_state = trace_state
        self._parent_id = parent_id  # 0: a root
        self._remote = remote  # the parent came from another process
        self._context: SpanContext | None = None
        self._fixed = fixed
        self._attributes = attributes
        self._user: BoundedAttributes | None = None
        self._events: BoundedList[Event] | None = None
        self._links: BoundedList[Link] | None = None
        self._status = _UNSET
        self._end: int | None = None
        if sampler_attributes:
            self.set_attributes(sampler_attributes)
        self._start = time.time_ns()

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self._trace_id,
                self._span_id,
                is_remote=False,
                trace_flags=TraceFlags(self._flags),
                trace_state=self._trace_state,
            )
        return context

    def traceparent(self) -> str:
        """This span's W3C ``traceparent`` header."""
        return "00-%032x-%016x-%02x" % (self._trace_id, self._span_id, self._flags)  # noqa: UP031 (faster than an f-string)

    def is_recording(self) -> bool:
        return self._end is None

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time if end_time is not None else time.time_ns()
        self._recorder._finish(self)

    def set_own(self, key: str, value: AttributeValue) -> None:
        """One of busagents' own attributes (a valid value), at no checking cost, before the span ends."""
        if self._end is None:
            self._attributes[key] = value

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if self._end is not None:
            return
        user = self._user
        if user is None:
            limits = self._recorder.limits
            room = (
                None
                if limits.max_span_attributes is None
                else max(0, limits.max_span_attributes - len(self._fixed.attributes) - len(self._attributes))
            )
            user = self._user = BoundedAttributes(room, immutable=False, max_value_len=limits.max_attribute_length)
        user[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None, timestamp: int | None = None
    ) -> None:
        if self._end is not None:
            return
        limits = self._recorder.limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        self._events.append(Event(name, self._bounded(limits.max_event_attributes, attributes), timestamp))

    def add_link(self, context: SpanContext, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        if self._end is not None or not (context.is_valid or attributes or context.trace_state):
            return
        limits = self._recorder.limits
        if self._links is None:
            self._links = BoundedList(limits.max_links)
        self._links.append(Link(context, self._bounded(limits.max_link_attributes, attributes)))

    def _bounded(self, most: int | None, attributes: Mapping[str, AttributeValue] | None) -> BoundedAttributes:
        """An event's or link's attributes, within the span limits (as the SDK's span keeps them)."""
        return BoundedAttributes(
            most, attributes, max_value_len=self._recorder.limits.max_attribute_length, immutable=True
        )

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._shape = Shape(name, self._shape.kind, self._recorder._encoder)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is not StatusCode.UNSET:
                self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, AttributeValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()
