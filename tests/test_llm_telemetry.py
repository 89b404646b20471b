"""LLM calls in the conversation's trace: the model calls and the tool calls, with GenAI attributes."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from busagents import Bus
from busagents.llm import LLMSettings
from busagents.llm.testing import MessagesServer, tool_use
from busagents.server import NatsServer
from busagents.telemetry import Telemetry
from busagents.testing import run_agents

from .llm_agents import ContextAgent, Disrupted, LLMReasoner, Rebook

GOOD = {"booking_id": "B1", "flight_id": "F2", "cost": 80.0, "rationale": "F2 arrives first"}


def one(spans: list[ReadableSpan], prefix: str) -> ReadableSpan:
    found = [s for s in spans if s.name.startswith(prefix)]
    assert len(found) == 1, (prefix, [s.name for s in spans])
    return found[0]


def parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, span.name
    return span.parent.span_id


async def test_model_and_tool_calls_are_spans_of_the_conversation_trace(
    nats_server: NatsServer, messages_server: MessagesServer
) -> None:
    messages_server.script(
        tool_use("find_flights", {"origin": "LHR", "destination": "JFK"}),
        tool_use("get_note", {"booking_id": 123}),  # invalid input: the query is never sent
        tool_use("decide", GOOD, input_tokens=300, output_tokens=40, cache_read_input_tokens=1200),
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    bus = await Bus.connect(nats_server.url, telemetry=Telemetry(provider, MeterProvider(metric_readers=[reader])))
    settings = LLMSettings.for_agent("test_llm_reasoner", max_retries=0)
    try:
        async with run_agents(bus, LLMReasoner(settings, messages_server), ContextAgent()):
            async with bus.expect(Rebook, timeout=15) as got:
                await bus.publish(Disrupted(booking_id="B1", origin="LHR", destination="JFK"))
    finally:
        await bus.close()
    assert got.message.body.decided_by == "model"
    spans = list(exporter.get_finished_spans())

    handled = one(spans, "process test.llm.disrupted")
    agent = one(spans, "invoke_agent test_llm_reasoner")
    calls = sorted((s for s in spans if s.name == "chat claude-sonnet-4-6"), key=lambda s: s.start_time or 0)
    find = one(spans, "execute_tool find_flights")
    note = one(spans, "execute_tool get_note")
    query = one(spans, "send test.llm.flights")
    answered = one(spans, "process test.llm.flights")
    decided = one(spans, "publish test.llm.rebook")

    assert len({s.context.trace_id for s in spans}) == 1  # one trace, from the disruption to the decision
    assert parent_of(agent) == handled.context.span_id
    assert len(calls) == 3 and all(parent_of(c) == agent.context.span_id for c in calls)
    assert parent_of(find) == parent_of(note) == agent.context.span_id
    assert parent_of(query) == find.context.span_id  # the bus query the tool made
    assert parent_of(answered) == query.context.span_id  # and the context agent answering it
    assert parent_of(decided) == handled.context.span_id

    last = calls[-1]
    assert last.kind is SpanKind.CLIENT
    attrs = last.attributes or {}
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.model"] == "claude-sonnet-4-6" and attrs["gen_ai.response.model"] == "claude-test"
    assert attrs["gen_ai.usage.input_tokens"] == 300 and attrs["gen_ai.usage.output_tokens"] == 40
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 1200
    assert attrs["gen_ai.response.finish_reasons"] == ("tool_use",)
    assert attrs["openinference.span.kind"] == "LLM"
    assert (find.attributes or {})["gen_ai.tool.name"] == "find_flights"
    assert find.status.status_code is StatusCode.UNSET
    assert note.status.status_code is StatusCode.ERROR  # the failed tool call is visible in the trace
    assert "Expected `str`, got `int`" in (note.status.description or "")
    agent_attrs = agent.attributes or {}
    assert agent_attrs["busagents.llm.source"] == "model"
    per_call = [(c.attributes or {})["gen_ai.usage.input_tokens"] for c in calls]
    assert agent_attrs["gen_ai.usage.input_tokens"] == sum(int(str(n)) for n in per_call)

    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    tokens: dict[tuple[str, str], float] = {}  # (token type, busagents.llm.cache: "" or read/creation)
    for point in metrics["gen_ai.client.token.usage"].data.data_points:
        assert isinstance(point, HistogramDataPoint) and point.attributes is not None
        assert point.attributes["gen_ai.response.model"] == "claude-test"
        kind = (str(point.attributes["gen_ai.token.type"]), str(point.attributes.get("busagents.llm.cache", "")))
        tokens[kind] = point.sum
    assert tokens["input", ""] == agent_attrs["gen_ai.usage.input_tokens"]
    assert tokens["output", ""] == agent_attrs["gen_ai.usage.output_tokens"]
    assert tokens["input", "read"] == 1200  # the prompt-cache reads the server counted, as input tokens
    (duration,) = metrics["gen_ai.client.operation.duration"].data.data_points
    assert isinstance(duration, HistogramDataPoint) and duration.count == 3
