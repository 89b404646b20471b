"""OpenTelemetry: one trace across every hop, messaging attributes, OTLP export from `busagents run`."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextvars import Token
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from busagents import Agent, Bus, Context, event, on
from busagents._otlp import EncodingSpanProcessor
from busagents.server import NatsServer
from busagents.telemetry import Telemetry
from busagents.testing import OtlpReceiver, delete_streams, run_agents

from .drain_agent import Done, Job
from .test_envelope import First, HopA, HopD, Second, Third


async def test_one_trace_spans_every_hop_of_a_conversation(nats_server: NatsServer) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    telemetry = Telemetry(tracer_provider, MeterProvider(metric_readers=[reader]))
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    try:
        async with run_agents(bus, First(), Second(), Third()):
            async with bus.expect(HopD) as got:
                root = await bus.publish(HopA(n=1))
    finally:
        await bus.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    chain = [
        "publish test.hops.a",
        "process test.hops.a",
        "publish test.hops.b",
        "process test.hops.b",
        "publish test.hops.c",
        "process test.hops.c",
        "publish test.hops.d",
    ]
    assert set(chain) <= set(spans), sorted(spans)
    trace_ids = {spans[name].context.trace_id for name in chain}
    assert len(trace_ids) == 1  # one trace for the whole conversation
    for parent, child in itertools.pairwise(chain):
        parent_context = spans[child].parent
        assert parent_context is not None
        assert parent_context.span_id == spans[parent].context.span_id, (parent, child)
    process = spans["process test.hops.b"]
    assert process.kind is SpanKind.CONSUMER
    assert process.attributes is not None
    assert process.attributes["messaging.system"] == "nats"
    assert process.attributes["messaging.consumer.group.name"] == "second"
    assert process.attributes["messaging.message.conversation_id"] == root.conversation_id
    assert spans["publish test.hops.a"].kind is SpanKind.PRODUCER
    assert got.message.envelope.traceparent is not None
    assert f"{spans['publish test.hops.d'].context.trace_id:032x}" in got.message.envelope.traceparent
    data = reader.get_metrics_data()
    assert data is not None
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"messaging.client.sent.messages", "messaging.process.duration"} <= names


async def test_a_dead_lettered_message_has_an_error_span(nats_server: NatsServer) -> None:
    from .test_worker import DeadLetters, Order, Shop

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = await Bus.connect(nats_server.url, telemetry=Telemetry(provider))
    try:
        async with run_agents(bus, Shop()), DeadLetters(bus, "shop") as dlq:
            await bus.publish(Order(order_id="neg", quantity=-1))
            await dlq.next()
        # leaving run_agents drained the worker: every handler, and so its span, has finished
    finally:
        await bus.close()
    process = [s for s in exporter.get_finished_spans() if s.name == "process test.worker.order.*"]
    assert process and process[0].status.status_code is StatusCode.ERROR
    assert process[0].attributes is not None
    assert process[0].attributes["busagents.outcome"] == "dead_lettered"


def traced_bus_parts() -> tuple[InMemorySpanExporter, Telemetry]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, Telemetry(provider)


def process_span(exporter: InMemorySpanExporter, message_id: str) -> ReadableSpan:
    (span,) = [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.CONSUMER and s.attributes and s.attributes.get("messaging.message.id") == message_id
    ]
    return span


async def test_a_dead_letter_in_another_lane_leaves_a_successful_span_ok(nats_server: NatsServer) -> None:
    from .test_worker import DeadLetters, Order

    class Pair(Agent):
        """Two lanes: holds a good order until released, fails a bad one meanwhile."""

        name = "pair"
        max_concurrency = 2

        def __init__(self) -> None:
            self.holding = asyncio.Event()
            self.release = asyncio.Event()

        @on(Order)
        async def take(self, order: Order, ctx: Context) -> None:
            if order.quantity < 0:
                raise ValueError(f"negative quantity {order.quantity}")
            self.holding.set()
            await self.release.wait()

    exporter, telemetry = traced_bus_parts()
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    pair = Pair()
    try:
        async with run_agents(bus, pair), DeadLetters(bus, "pair") as dlq:
            good = await bus.publish(Order(order_id="good", quantity=1))
            await asyncio.wait_for(pair.holding.wait(), 5)
            bad = await bus.publish(Order(order_id="bad", quantity=-1))
            await dlq.next()  # dead-lettered while the good one is still in its lane
            pair.release.set()
    finally:
        await bus.close()
    good_span, bad_span = process_span(exporter, good.id), process_span(exporter, bad.id)
    assert good_span.status.status_code is StatusCode.UNSET
    assert good_span.attributes is not None and good_span.attributes["busagents.outcome"] == "handled"
    assert bad_span.status.status_code is StatusCode.ERROR
    assert bad_span.attributes is not None and bad_span.attributes["busagents.outcome"] == "dead_lettered"


async def test_a_durable_message_retried_after_a_failure_has_an_error_span_then_an_ok_one(
    nats_server: NatsServer,
) -> None:
    from .test_durable import Doer, Done, Task

    exporter, telemetry = traced_bus_parts()
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    try:
        async with run_agents(bus, Doer()):
            async with bus.expect(Done, where=lambda d: d.task_id == "flaky-span"):
                sent = await bus.publish(Task(task_id="flaky-span", fail_times=1))
    finally:
        await delete_streams(bus)
        await bus.close()
    spans = [
        s
        for s in exporter.get_finished_spans()
        if s.kind is SpanKind.CONSUMER and s.attributes and s.attributes.get("messaging.message.id") == sent.id
    ]
    outcomes = [(s.attributes or {}).get("busagents.outcome") for s in spans]
    assert outcomes == ["retry", "handled"]
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR, StatusCode.UNSET]


async def test_a_handler_sees_its_consumer_span_as_ctx_span(nats_server: NatsServer) -> None:

    from .test_envelope import HopA

    class Marker(Agent):
        name = "span-marker"

        def __init__(self) -> None:
            self.span_ids: list[int] = []

        @on(HopA)
        async def hop(self, msg: HopA, ctx: Context) -> None:
            ctx.span.set_attribute("app.marked", msg.n)
            self.span_ids.append(ctx.span.get_span_context().span_id)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = await Bus.connect(nats_server.url, telemetry=Telemetry(provider))
    marker = Marker()
    try:
        async with run_agents(bus, marker):
            await bus.publish(HopA(n=7))
            await bus.flush()
        # leaving run_agents drained the worker: the handler ran and its span finished
    finally:
        await bus.close()
    (process,) = [s for s in exporter.get_finished_spans() if s.name == "process test.hops.a"]
    assert marker.span_ids == [process.context.span_id]
    assert process.attributes is not None and process.attributes["app.marked"] == 7


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []
    event = threading.Event()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received.append((self.path, body))
        if self.path == "/v1/traces":
            type(self).event.set()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Collector)
    _Collector.received = []
    _Collector.event = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


async def test_busagents_run_exports_spans_over_otlp(nats_server: NatsServer, bus: Bus, otlp_collector: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector,
        "OTEL_SERVICE_NAME": "slow-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "run", "drain_agent:Slow", "--nats", nats_server.url, env=env
    )
    try:
        await stats.next_msg(timeout=20)
        await stats.unsubscribe()
        async with bus.expect(Done, where=lambda d: d.n == 7, timeout=10):
            await bus.publish(Job(n=7))
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        assert await asyncio.to_thread(_Collector.event.wait, 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    traces = b"".join(body for path, body in _Collector.received if path == "/v1/traces")
    assert b"process test.drain.job" in traces  # span names travel as plain strings in the protobuf
    assert b"slow-under-test" in traces  # the service name from OTEL_SERVICE_NAME


def test_console_exporter_prints_spans_and_other_otlp_protocols_are_clear_errors(nats_server: NatsServer) -> None:
    probe = (
        "from busagents.telemetry import configure_from_env, shutdown\n"
        "t = configure_from_env('probe')\n"
        "with t.span('probe span'):\n"
        "    pass\n"
        "shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    console = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "OTEL_TRACES_EXPORTER": "console"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert console.returncode == 0, console.stderr
    assert '"name": "probe span"' in console.stdout and '"service.name": "probe"' in console.stdout
    grpc = subprocess.run(
        [sys.executable, "-m", "busagents", "run", "busagents.agent:Agent", "--nats", nats_server.url],
        env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert grpc.returncode == 1
    assert "OTLP protocol 'grpc': busagents exports OTLP over HTTP" in grpc.stderr
    assert "Traceback" not in grpc.stderr


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


_SAMPLED_PROBE = """
import asyncio, json
from nats.aio.msg import Msg
from busagents.envelope import Envelope
from busagents.telemetry import configure_from_env, shutdown
from busagents.worker import Outcome

t = configure_from_env("probe")
parents = []
for _ in range(400):
    envelope = Envelope.new("Probe", 1, sender="probe-feed")
    with t.publish_span("probe.a.1", "probe.a.*", envelope):
        pass
    parents.append(envelope.to_headers())

async def handled(msg):
    return Outcome.HANDLED

handle = t.traced_handle(handled, agent="probe-agent", contract="Probe", template="probe.a.*")

async def main():
    for headers in parents:
        await handle(Msg(None, subject="probe.a.1", data=b"{}", headers=headers))

asyncio.run(main())
shutdown()
print(json.dumps([h["traceparent"][-2:] for h in parents]))
"""


def test_the_standard_sampler_variables_decide_which_conversations_are_kept(otlp_receiver: OtlpReceiver) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
    }
    probe = subprocess.run([sys.executable, "-c", _SAMPLED_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    flags = json.loads(probe.stdout)
    sampled = sum(int(f, 16) & 1 for f in flags)
    assert 120 < sampled < 280  # about half of 400 roots
    spans = otlp_receiver.snapshot()
    roots = [s for s in spans if s.name == "publish probe.a.*"]
    handled = [s for s in spans if s.name == "process probe.a.*"]
    assert len(roots) == len(handled) == sampled  # a hop is kept exactly when its conversation's root was
    assert {s.trace_id for s in roots} == {s.trace_id for s in handled}
    assert {s.service for s in roots} == {"probe-feed"} and {s.service for s in handled} == {"probe-agent"}


@event("test.telemetry.price", key="item", durable=True)
class PriceSet(msgspec.Struct):
    """A price on a stream of its own (a view's stream is read whole: other tests' views stay apart)."""

    item: str
    cents: int


@event("test.telemetry.price-seen", key="item")
class PriceSeen(msgspec.Struct):
    item: str


class PriceWatch(Agent):
    """A view of the prices that tells when it saw one (what a view's handler publishes continues the trace)."""

    name = "price-watch"
    produces = (PriceSeen,)

    @on(PriceSet, view=True)
    async def price(self, msg: PriceSet, ctx: Context) -> None:
        await ctx.publish(PriceSeen(item=msg.item))


@pytest.mark.parametrize("trace_views", [False, True])
async def test_a_view_handler_has_no_span_unless_asked_and_stays_in_the_senders_trace(
    nats_server: NatsServer, trace_views: bool
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider, trace_views=trace_views)
    item = f"view-span-{trace_views}"
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    try:
        async with run_agents(bus, PriceWatch()):
            async with bus.expect(PriceSeen, where=lambda m: m.item == item) as got:
                sent = await bus.publish(PriceSet(item=item, cents=120))
    finally:
        await bus.close()
    spans = exporter.get_finished_spans()
    (publish,) = [s for s in spans if s.name == "publish test.telemetry.price.*" and s.attributes
                  and s.attributes["messaging.message.id"] == sent.id]  # fmt: skip
    (seen,) = [s for s in spans if s.name == "publish test.telemetry.price-seen.*" and s.attributes
               and s.attributes["messaging.message.id"] == got.message.envelope.id]  # fmt: skip
    trace_id = publish.context.trace_id
    views = [s for s in spans if s.name == "process test.telemetry.price.*" and s.context.trace_id == trace_id]
    assert seen.context.trace_id == trace_id  # one trace, with or without the view's span
    assert seen.parent is not None
    if trace_views:
        assert [s.kind for s in views] == [SpanKind.CONSUMER]
        assert seen.parent.span_id == views[0].context.span_id
    else:
        assert views == []
        assert seen.parent.span_id == publish.context.span_id  # the view ran in the sender's context
    consumed = telemetry._processed[("test.telemetry.price.*", "price-watch", "handled")]
    assert consumed >= 1  # counted either way


def test_a_views_sender_context_is_read_from_its_header_only_when_asked() -> None:
    """A view handler runs in its sender's context; the header is parsed when something asks for it."""
    from busagents.telemetry import _Carried

    trace_hex, span_hex = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    carried = _Carried(f"00-{trace_hex}-{span_hex}-01", "vendor=1")
    assert carried._context is None  # nothing parsed until asked
    context = carried.get_span_context()
    assert (context.trace_id, context.span_id) == (int(trace_hex, 16), int(span_hex, 16))
    assert context.is_remote and context.trace_flags.sampled and not carried.is_recording()
    assert context.trace_state.get("vendor") == "1"
    assert carried.get_span_context() is context  # parsed once
    for malformed in (f"00-{'z' * 32}-{span_hex}-01", f"00-{'0' * 32}-{span_hex}-01", f"ff-{trace_hex}-{span_hex}-01"):
        assert not _Carried(malformed, None).get_span_context().is_valid  # what it sends starts a new trace


def test_the_current_span_is_read_and_set_as_the_api_does_with_any_context_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """busagents reads the API's ContextVar directly; with another context runtime it uses the API."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context.context import _RuntimeContext

    from busagents.telemetry import _context_functions

    span = trace.NonRecordingSpan(trace.SpanContext(1, 2, is_remote=True))
    current, with_span, attach, detach = _context_functions()
    assert current is not trace.get_current_span  # the direct path, with the default runtime
    assert current() is trace.INVALID_SPAN
    token = attach(with_span(span))
    try:
        assert current() is span and trace.get_current_span() is span  # the API sees what busagents set
        inner = trace.NonRecordingSpan(trace.SpanContext(3, 4, is_remote=False))
        with trace.use_span(inner):  # and busagents sees what the API set
            assert current() is inner
    finally:
        detach(token)
    assert current() is trace.INVALID_SPAN

    class OtherRuntime(_RuntimeContext):  # what OTEL_PYTHON_CONTEXT could name
        def attach(self, context: otel_context.Context) -> Token[otel_context.Context]:
            raise NotImplementedError

        def get_current(self) -> otel_context.Context:
            raise NotImplementedError

        def detach(self, token: Token[otel_context.Context]) -> None:
            raise NotImplementedError

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", OtherRuntime())
    functions = _context_functions()
    assert functions == (trace.get_current_span, trace.set_span_in_context, otel_context.attach, otel_context.detach)


@event("test.telemetry.parcel", key="order")
class Parcel(msgspec.Struct):
    order: str
    items: int


@event("test.telemetry.shipped", key="item")
class Shipped(msgspec.Struct):
    order: str
    item: str


class Packer(Agent):
    """Returns one ``Shipped`` per item of a parcel: a batch send."""

    name = "packer"
    produces = (Shipped,)

    @on(Parcel)
    async def pack(self, order: Parcel, ctx: Context) -> list[Shipped]:
        return [Shipped(order=order.order, item=f"{order.order}-{i}") for i in range(order.items)]


class ShippedLog(Agent):
    """Keeps the trace context each ``Shipped`` came with; ``done`` once it has ``expected`` of them."""

    name = "shipped-log"

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.traceparents: list[str | None] = []
        self.done = asyncio.Event()

    @on(Shipped)
    async def shipped(self, msg: Shipped, ctx: Context) -> None:
        assert ctx.envelope is not None
        self.traceparents.append(ctx.envelope.traceparent)
        if len(self.traceparents) == self.expected:
            self.done.set()


@pytest.mark.parametrize("sampled", [True, False])
async def test_what_a_handler_returns_as_a_list_is_one_batch_send_span_every_message_carries(
    nats_server: NatsServer, sampled: bool
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON if sampled else ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(provider, parent_based=True)
    log = ShippedLog(expected=5)
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    try:
        async with run_agents(bus, Packer(), log):  # leaving it drains the handlers: their spans are ended
            sent = await bus.publish(Parcel(order=f"batch-{sampled}", items=5))
            await asyncio.wait_for(log.done.wait(), 10)
    finally:
        await bus.close()
    spans = exporter.get_finished_spans()
    sends = [s for s in spans if s.name == "publish test.telemetry.shipped.*"]
    handled = [s for s in spans if s.name == "process test.telemetry.shipped.*"]
    assert telemetry._sent[("test.telemetry.shipped.*", "Shipped")] == 5, telemetry._sent  # each message counted
    assert len(set(log.traceparents)) == 1  # every message carries the same context: the batch's
    traceparent = log.traceparents[0]
    assert traceparent is not None
    if not sampled:
        assert sends == [] and handled == []
        assert sent.traceparent is not None
        assert traceparent[:-2] == sent.traceparent[:-2]  # the sender's context, carried on as it came,
        assert int(traceparent[-2:], 16) & 1 == 0  # not sampled (the trace id may be flagged random)
        return
    (send,) = sends  # one span for the five messages
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes is not None
    assert send.attributes["messaging.batch.message_count"] == 5
    assert send.attributes["messaging.destination.template"] == "test.telemetry.shipped.*"
    assert "messaging.destination.name" not in send.attributes  # five subjects, one per item
    assert send.attributes["messaging.message.conversation_id"] == sent.conversation_id
    assert send.attributes["busagents.agent"] == "packer"
    (process,) = [s for s in spans if s.name == "process test.telemetry.parcel.*"]
    assert send.parent is not None and send.parent.span_id == process.context.span_id
    assert traceparent.startswith(f"00-{send.context.trace_id:032x}-{send.context.span_id:016x}-")
    assert len(handled) == 5
    assert {s.parent.span_id for s in handled if s.parent is not None} == {send.context.span_id}


async def test_bus_publish_many_is_one_span_per_conversation(nats_server: NatsServer) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = await Bus.connect(nats_server.url, telemetry=Telemetry(provider))
    try:
        fresh = await bus.publish_many([Shipped(order="a", item=f"a-{i}") for i in range(3)], sender="feed")
        joined = await bus.publish_many(
            [Shipped(order="b", item=f"b-{i}") for i in range(3)], sender="feed", conversation_id="conv-b"
        )
        with pytest.raises(ValueError, match="3 messages but 2 message ids"):
            await bus.publish_many([Shipped(order="c", item=f"c-{i}") for i in range(3)], msg_ids=["x", "y"])
    finally:
        await bus.close()
    spans = exporter.get_finished_spans()
    # three conversations started: a span each, in a trace each
    assert len({e.conversation_id for e in fresh}) == 3
    alone = [s for s in spans if s.attributes and s.attributes.get("messaging.message.id") in {e.id for e in fresh}]
    assert len(alone) == 3 and len({s.context.trace_id for s in alone}) == 3
    assert all("messaging.batch.message_count" not in (s.attributes or {}) for s in alone)
    # one conversation: one span for the three
    (batch,) = [s for s in spans if s.attributes and s.attributes.get("messaging.message.conversation_id") == "conv-b"]
    assert batch.attributes is not None and batch.attributes["messaging.batch.message_count"] == 3
    (traceparent,) = {e.traceparent for e in joined}
    assert traceparent is not None
    assert traceparent.startswith(f"00-{batch.context.trace_id:032x}-{batch.context.span_id:016x}-")
    assert int(traceparent[-2:], 16) & 1  # sampled


class ShippedTogether(Agent):
    """Holds every ``Shipped`` of a parcel until all of them are being handled; one of them fails."""

    name = "shipped-together"

    def __init__(self, expected: int, failing: str) -> None:
        self.expected = expected
        self.failing = failing
        self.arrived = 0
        self.all_here = asyncio.Event()
        self.span_ids: set[int] = set()

    @on(Shipped)
    async def shipped(self, msg: Shipped, ctx: Context) -> None:
        self.span_ids.add(ctx.span.get_span_context().span_id)
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), 10)  # each waits, as on a store or a reply
        if msg.item == self.failing:
            raise ValueError(f"no room for {msg.item}")


def one_span(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name]
    return found


def _otlp_telemetry(endpoint: str) -> tuple[Telemetry, EncodingSpanProcessor]:
    """Telemetry whose message spans busagents records and encodes itself, as configure_from_env sets it up."""
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from busagents._otlp import FastOTLPSpanExporter, RecordedSpan, SpanRecorder

    processor = EncodingSpanProcessor(FastOTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    telemetry = Telemetry(provider, parent_based=True)

    def recorder_of(tracer: object) -> SpanRecorder:
        assert isinstance(tracer, SdkTracer)
        return SpanRecorder(processor, tracer, InstrumentationScope("busagents", "test"))

    telemetry._recorder_of = recorder_of
    telemetry._own_span = RecordedSpan
    return telemetry, processor


@pytest.mark.parametrize("spans", ["sdk", "recorded"])
async def test_messages_of_one_batch_handled_at_the_same_time_share_one_consumer_span(
    nats_server: NatsServer, otlp_receiver: OtlpReceiver, spans: str
) -> None:
    exporter = InMemorySpanExporter()
    processor = None
    if spans == "sdk":
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        telemetry = Telemetry(provider, parent_based=True)
    else:
        telemetry, processor = _otlp_telemetry(otlp_receiver.endpoint)
    together = ShippedTogether(expected=5, failing=f"together-{spans}-3")
    bus = await Bus.connect(nats_server.url, telemetry=telemetry)
    try:
        async with run_agents(bus, Packer(), together):
            sent = await bus.publish(Parcel(order=f"together-{spans}", items=5))
            await asyncio.wait_for(together.all_here.wait(), 10)
    finally:
        await bus.close()
    assert len(together.span_ids) == 1  # every handler ran in the same span
    if spans == "sdk":
        finished = exporter.get_finished_spans()
        send = one_span(finished, "publish test.telemetry.shipped.*")
        process = one_span(finished, "process test.telemetry.shipped.*")
        attributes = dict(process.attributes or {})
        assert process.parent is not None and process.parent.span_id == send.context.span_id
        assert process.context.span_id in together.span_ids
        assert process.status.status_code is StatusCode.ERROR
        assert process.status.description == "1 of 5: dead-lettered"
    else:
        assert processor is not None
        processor.shutdown()  # exports what is queued
        received = otlp_receiver.snapshot()
        (send_r,) = [s for s in received if s.name == "publish test.telemetry.shipped.*"]
        (process_r,) = [s for s in received if s.name == "process test.telemetry.shipped.*"]
        attributes = process_r.attributes
        assert process_r.parent_span_id == send_r.span_id
        assert int(process_r.span_id, 16) in together.span_ids
    assert attributes["messaging.batch.message_count"] == 5
    assert attributes["messaging.destination.template"] == "test.telemetry.shipped.*"
    assert attributes["messaging.message.conversation_id"] == sent.conversation_id
    assert "messaging.message.id" not in attributes  # five messages, five ids
    assert "messaging.destination.name" not in attributes  # five subjects, one per item
    assert attributes["busagents.outcome"] == "dead_lettered"
    assert attributes["busagents.agent"] == "shipped-together"


_NO_METRICS_PROBE = """
import asyncio, json
from nats.aio.msg import Msg
from busagents.envelope import Envelope
from busagents.telemetry import configure_from_env, shutdown
from busagents.worker import Outcome

t = configure_from_env("probe")
recorded = []
t.duration.record = lambda *args, **kwargs: recorded.append(args)  # the SDK histogram: must not be fed

async def handled(msg):
    return Outcome.HANDLED

handle = t.traced_handle(handled, agent="probe-agent", contract="Probe", template="probe.b.*")

async def main():
    for _ in range(20):
        envelope = Envelope.new("Probe", 1, sender="probe-feed")
        with t.publish_span("probe.b.1", "probe.b.*", envelope):
            pass
        await handle(Msg(None, subject="probe.b.1", data=b"{}", headers=envelope.to_headers()))

asyncio.run(main())
shutdown()
print(json.dumps({"recorded": len(recorded), "handled": sum(t._processed.values())}))
"""


def test_with_no_metrics_exporter_traces_go_out_and_no_duration_is_measured(otlp_receiver: OtlpReceiver) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_METRICS_EXPORTER": "none"}
    probe = subprocess.run(
        [sys.executable, "-c", _NO_METRICS_PROBE], env=env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    assert result["recorded"] == 0  # nobody reads the histogram: measuring it would cost 15 to 30 µs a message
    assert result["handled"] == 20  # the handled messages are still counted
    spans = otlp_receiver.snapshot()
    assert len([s for s in spans if s.name == "process probe.b.*"]) == 20
    assert otlp_receiver.metric_requests == []
