"""Testing kit: a real nats-server per test session, agents run in-process, typed waits.

Enable it in ``conftest.py``::

    pytest_plugins = ["busagents.testing"]

then::

    async def test_rebooks(bus):
        async with run_agents(bus, Rebooker()):
            async with bus.expect(BookingChanged, where=lambda m: m.booking_id == "B1") as got:
                await bus.publish(RebookPassenger(booking_id="B1", flight_id="BA117"))
        assert got.message.body.flight_id == "BA117"

Never a server that happens to be running already: each session starts its own
on a free loopback port, with JetStream in a temporary directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio

from .agent import Agent
from .bus import Bus
from .server import NatsServer
from .worker import Worker

log = logging.getLogger("busagents.testing")

__all__ = ["OtlpReceiver", "ReceivedSpan", "bus", "delete_streams", "nats_server", "run_agents"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server with JetStream, started for this test session."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A bus connected to the session's nats-server, closed after the test.

    JetStream streams (durable contracts, dead letters, KV buckets) are deleted after the
    test, so stored messages never leak into the next test's durable consumers.
    """
    connected = await Bus.connect(nats_server.url, name="busagents-test")
    try:
        yield connected
    finally:
        await delete_streams(connected)
        await connected.close()


async def delete_streams(bus: Bus, attempts: int = 3) -> None:
    """Delete every JetStream stream (and so its consumers) on the bus's server: a clean slate between tests.

    A busy server may time an API request out: tried again (``attempts`` in all), so that a stream
    does not outlive its test and feed the next one's consumers; a server without JetStream, or
    a closed connection, has nothing to clean.
    """
    for attempt in range(attempts):
        try:
            for name in await bus.js.streams_info():
                await bus.js.delete_stream(name.config.name or "")
            return
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            return  # no JetStream
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
            return
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            if attempt + 1 == attempts:
                log.warning("could not delete the test streams: %r", exc)


@asynccontextmanager
async def run_agents(bus: Bus, *agents: Agent, drain_timeout: float = 10.0) -> AsyncIterator[Worker]:
    """Run ``agents`` in this process on ``bus`` until the block ends, then drain them.

    A start that fails raises here with nothing left running (see :meth:`Worker.start`).
    """
    async with Worker(agents, bus, drain_timeout=drain_timeout) as worker:
        yield worker


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as an OTLP receiver got it: ids as hex, the exporting service, attributes as plain values."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    kind: str  # "SERVER", "CLIENT", "PRODUCER", "CONSUMER" or "INTERNAL"
    service: str  # the resource's service.name
    attributes: dict[str, Any]


class OtlpReceiver:
    """An OTLP/HTTP receiver on a free loopback port that keeps the spans it is sent (``/v1/traces``).

    The bodies of metric exports (``/v1/metrics``, ``ExportMetricsServiceRequest`` bytes) are
    kept as they came, in :attr:`metric_requests`. Point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at
    :attr:`endpoint`. ``decode=False`` only counts the requests and bytes (what a benchmark needs,
    at no cost to the process under test).
    """

    def __init__(self, *, decode: bool = True) -> None:
        self.decode = decode
        self.spans: list[ReceivedSpan] = []
        self.metric_requests: list[bytes] = []
        self.requests = 0
        self.bytes = 0
        #: TCP connections accepted: a sender that keeps its connection alive (HTTP/1.1) opens one.
        self.connections = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def _keep(self, path: str, body: bytes) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += len(body)
        if path == "/v1/metrics" and self.decode:
            with self._lock:
                self.metric_requests.append(body)
        if path != "/v1/traces" or not self.decode:
            return
        spans = _decode_spans(body)
        with self._lock:
            self.spans.extend(spans)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps the connection, as collectors do (HTTP/1.0 closes each)

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver._keep(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _decode_spans(body: bytes) -> list[ReceivedSpan]:
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(MessageToDict(a.value)) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        service=str(resource.get("service.name", "")),
                        attributes={a.key: _value(MessageToDict(a.value)) for a in s.attributes},
                    )
                )
    return spans


def _value(any_value: dict[str, Any]) -> Any:
    """An OTLP AnyValue (as a dict) as a plain value; int64 travels as a string in JSON form."""
    if not any_value:
        return None
    (kind, value), *_ = any_value.items()
    if kind == "intValue":
        return int(value)
    if kind == "arrayValue":
        return [_value(v) for v in value.get("values", [])]
    return value
