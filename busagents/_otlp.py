"""Adapter to the OTLP/HTTP span exporter of ``opentelemetry-exporter-otlp-proto-http``: a faster encoder.

The exporter's own encoder builds a protobuf object per span, attribute and value (about
100 µs a span under load, in the export thread, holding the GIL the event loop needs); here
the spans are written to the same ``ExportTraceServiceRequest`` wire bytes directly, keys,
names, resources and scopes encoded once and kept. The exporter's private ``_client`` (1.39
and later) sends them; with another release the library's own ``export`` runs unchanged.
tests/test_otlp.py checks the bytes decode to the same request the library's encoder makes.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

__all__ = ["EncodingSpanProcessor", "FastOTLPSpanExporter", "encode_spans"]

log = logging.getLogger("busagents.telemetry")

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_fixed32 = struct.Struct("<I").pack
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_MAX_CACHED = 4096  # keys and names kept encoded: the spans' vocabulary is small


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


#: A span's (resource, scope, span) bytes; the first two are shared by every span of that resource and scope.
_Encoded = tuple[bytes, bytes, bytes]


def assemble(encoded: Sequence[_Encoded]) -> bytes:
    """The ``ExportTraceServiceRequest`` of spans encoded one by one: grouped by resource, then by scope."""
    grouped: dict[int, tuple[bytes, dict[int, tuple[bytes, list[bytes]]]]] = {}
    for resource_part, scope_part, span in encoded:
        scopes = grouped.setdefault(id(resource_part), (resource_part, {}))[1]
        scopes.setdefault(id(scope_part), (scope_part, []))[1].append(span)
    out = []
    for resource_part, scopes in grouped.values():
        scope_spans = b"".join(_field(2, scope_part + b"".join(spans)) for scope_part, spans in scopes.values())
        out.append(_field(1, resource_part + scope_spans))
    return b"".join(out)


class _Encoder:
    """Keeps what repeats from span to span encoded: attribute keys, span names, resources, scopes."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._names: dict[str, bytes] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """``spans`` as the bytes of one ``ExportTraceServiceRequest``."""
        return assemble([self.encode(span) for span in spans])

    def encode(self, span: ReadableSpan) -> _Encoded:
        """One span's bytes, with those of its resource and scope (kept: the same objects every time)."""
        resource_part, scope_part = self._remember(span.resource, span.instrumentation_scope)
        return resource_part, scope_part, _field(2, self._span(span))

    def _remember(self, resource: Resource, scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            self._trim(self._resources)
            encoded = _field(1, self._attributes(resource.attributes))
            if resource.schema_url:
                encoded += _field(3, resource.schema_url.encode())
            known = self._resources[id(resource)] = (resource, encoded)
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
            known_scope = self._scopes[id(scope)] = (scope, encoded)
        return known[1], known_scope[1]

    @staticmethod
    def _trim(cache: dict[Any, Any]) -> None:
        if len(cache) >= _MAX_CACHED:
            cache.clear()

    def _attributes(self, attributes: Mapping[str, Any] | None, number: int = 1) -> bytes:
        """Repeated KeyValue field ``number`` (1 in a Resource, 9 in a Span...)."""
        if not attributes:
            return b""
        keys = self._keys
        tag = _varint(number << 3 | 2)
        parts = []
        for key, value in attributes.items():
            encoded_key = keys.get(key)
            if encoded_key is None:
                self._trim(keys)
                encoded_key = keys[key] = _field(1, key.encode())
            if type(value) is str and len(value) < 40:  # the common case, inline: every length fits a byte
                raw = value.encode()
                n = len(raw)
                if n < 40:
                    kv = encoded_key + b"\x12" + _BYTE[n + 2] + b"\x0a" + _BYTE[n] + raw
                    parts.append(tag + _varint(len(kv)) + kv)
                    continue
            try:
                kv = encoded_key + _field(2, _value(value))
            except TypeError as exc:
                log.warning("span attribute %s not exported: %s", key, exc)
                continue
            parts.append(tag + _varint(len(kv)) + kv)
        return b"".join(parts)

    def _span(self, span: ReadableSpan) -> bytes:
        context = span.context
        assert context is not None
        name = self._names.get(span.name)
        if name is None:
            self._trim(self._names)
            name = self._names[span.name] = _field(5, span.name.encode())
        parts = [
            b"\x0a\x10" + context.trace_id.to_bytes(16, "big"),
            b"\x12\x08" + context.span_id.to_bytes(8, "big"),
        ]
        if context.trace_state:
            parts.append(_field(3, ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
        parent = span.parent
        if parent is not None:
            parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
        parts += (
            name,
            b"\x30" + _varint(span.kind.value + 1),
            b"\x39" + _fixed64(span.start_time or 0),
            b"\x41" + _fixed64(span.end_time or 0),
            self._attributes(span.attributes, 9),
        )
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            encoded = b"\x09" + _fixed64(event.timestamp) + _field(2, event.name.encode())
            encoded += self._attributes(event.attributes, 3)
            parts.append(_field(11, encoded))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            encoded = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
            encoded += b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
            encoded += self._attributes(link.attributes, 4) + b"\x35" + _fixed32(_flags(link.context))
            parts.append(_field(13, encoded))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        encoded = _field(2, status.description.encode()) if status.description else b""
        if status.status_code.value:
            encoded += b"\x18" + _varint(status.status_code.value)
        parts.append(_field(15, encoded))
        parts.append(b"\x85\x01" + _fixed32(_flags(parent)))
        return b"".join(parts)


def _flags(parent: SpanContext | None) -> int:
    return _HAS_IS_REMOTE | _IS_REMOTE if parent is not None and parent.is_remote else _HAS_IS_REMOTE


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as the bytes of one ``ExportTraceServiceRequest``."""
    return _Encoder().request(spans)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/HTTP span exporter (same variables, retries and limits), with the faster encoder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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
        self._exporting = threading.Lock()
        self._done = False
        #: Spans dropped because the queue was full (the collector too slow or down).
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="busagents-otlp-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if self._done or context is None or not context.trace_flags.sampled:
            return
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                log.warning("span export queue full (%d spans): %d spans dropped so far", self._max_queue, self.dropped)
            return
        try:
            self._queue.append(self._encoder.encode(span))
        except Exception:  # a span that does not encode is lost alone, with a trace of why
            log.exception("busagents could not encode span %r for OTLP", span.name)
            return
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._done:
            self._wake.wait(self._delay)
            self._wake.clear()
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
