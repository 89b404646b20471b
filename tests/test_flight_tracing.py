"""One trace per conversation, every agent in it, with the standard OTEL_* variables: `busagents demo` as run.

The demo runs as a command (in-process, and with ``--processes``) against an OTLP/HTTP receiver
in the test (:class:`busagents.testing.OtlpReceiver`, decoding ``ExportTraceServiceRequest``);
then one passenger's path is followed through the spans it exported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busagents_flight import stand_in
from busagents_travel import PassengerNotified

from busagents.contract import contract_info
from busagents.llm.testing import MessagesServer, RecordedRequest, Reply
from busagents.testing import OtlpReceiver, ReceivedSpan

AGENTS = {"status-feed", "flight-monitor", "flight-context", "flight-reasoner", "flight-rebooker", "flight-notifier"}
MESSAGING = (
    "messaging.system",
    "messaging.destination.name",
    "messaging.operation.type",
    "messaging.message.id",
    "messaging.message.conversation_id",
)
#: What a batch send's one span has instead (a handler that returns a list: the notifier's notices).
BATCH = (
    "messaging.system",
    "messaging.destination.template",
    "messaging.operation.type",
    "messaging.batch.message_count",
    "messaging.message.conversation_id",
)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def demo(receiver: OtlpReceiver, *options: str, env: dict[str, str] | None = None) -> None:
    """``busagents demo --day-seconds 0`` with the OTEL_* variables pointing at ``receiver``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "BUSAGENTS_"))}
    variables = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "busagents", "demo", "--day-seconds", "0", "--quiet", "--no-live", *options],
        env={**clean, **variables},
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def a_passengers_trace(spans: list[ReceivedSpan], *, with_span: str = "SERVER") -> list[ReceivedSpan]:
    """The trace of a passenger's notification that also holds a span of kind (or OpenInference kind) ``with_span``."""
    template = contract_info(PassengerNotified).subscribe_subject
    notices = [
        s for s in spans if s.name == f"publish {template}" and s.service == "flight-notifier" and s.kind == "PRODUCER"
    ]
    assert notices, sorted(Counter(s.name for s in spans).items())
    for trace_id in dict.fromkeys(n.trace_id for n in notices):
        trace = [s for s in spans if s.trace_id == trace_id]
        if any(with_span in (s.kind, s.attributes.get("openinference.span.kind")) for s in trace):
            return trace
    raise AssertionError(f"no notification's trace has a {with_span} span")


def check_one_passengers_path(spans: list[ReceivedSpan], *, with_span: str = "SERVER") -> list[ReceivedSpan]:
    trace = a_passengers_trace(spans, with_span=with_span)
    ids = {s.span_id for s in trace}
    roots = [s for s in trace if not s.parent_span_id]
    assert len(roots) == 1, roots
    assert roots[0].service == "status-feed" and roots[0].kind == "PRODUCER"
    assert all(s.parent_span_id in ids for s in trace if s.parent_span_id)  # no hop missing in between
    services = {s.service for s in trace}
    assert services >= AGENTS, services
    # the bus hops: every span but the model and tool calls and the agents' own (INTERNAL) spans
    hops = [s for s in trace if s.kind != "INTERNAL" and "gen_ai.operation.name" not in s.attributes]
    assert {s.kind for s in hops} == {"PRODUCER", "CONSUMER", "CLIENT", "SERVER"}
    for span in hops:
        batch = "messaging.batch.message_count" in span.attributes
        missing = [a for a in (BATCH if batch else MESSAGING) if not span.attributes.get(a)]
        assert not missing, (span.name, span.service, missing)
        assert span.attributes["messaging.system"] == "nats"
    conversation = roots[0].attributes["messaging.message.conversation_id"]
    assert {s.attributes["messaging.message.conversation_id"] for s in hops} == {conversation}
    assert {s.trace_id for s in spans if s.attributes.get("messaging.message.conversation_id") == conversation} == {
        roots[0].trace_id
    }  # one trace for the whole conversation
    # every query has its server side, in the context agent, as the child of the client span
    clients = [s for s in hops if s.kind == "CLIENT"]
    servers = [s for s in hops if s.kind == "SERVER"]
    assert clients and {s.parent_span_id for s in servers} >= {c.span_id for c in clients}
    assert {s.service for s in servers} == {"flight-context"}
    # the monitor consumes the status update and publishes the disruption
    monitor = {(s.kind, s.name.split()[0]) for s in trace if s.service == "flight-monitor"}
    assert {("CONSUMER", "process"), ("PRODUCER", "publish")} <= monitor
    # the notices of a booking change leave in one batch send: one span, however many passengers
    template = contract_info(PassengerNotified).subscribe_subject
    notices = [s for s in spans if s.service == "flight-notifier" and s.name == f"publish {template}"]
    sizes = Counter(s.attributes.get("messaging.batch.message_count", 1) for s in notices if s.kind == "PRODUCER")
    assert max(sizes) >= 2, sizes  # {messages in the send: spans}
    return trace


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["--in-process", "--processes"])
def test_the_demo_exports_one_trace_per_conversation_with_every_agent_in_it(receiver: OtlpReceiver, mode: str) -> None:
    demo(receiver, mode)
    check_one_passengers_path(receiver.snapshot())


def asks_then_decides(server: MessagesServer) -> Callable[[RecordedRequest], Reply]:
    """A stand-in model that searches further itineraries on its first turn (a tool call), then decides."""

    def respond(request: RecordedRequest) -> Reply:
        shared, case = stand_in.case_parts(request)
        searches = list((shared or {}).get("searches", {}).values())
        route = searches[0]["route"] if searches else f"{case.get('journey_from')}>{case.get('to')}"
        if len(request.messages) == 3 and "None" not in route:
            origin, destination = route.split(">")
            search = {"origin": origin, "destination": destination, "not_before": 0}
            return server.answer(
                request, [{"type": "tool_use", "id": "toolu_alt", "name": "alternatives", "input": search}]
            )
        if len(request.messages) == 5:  # the search answered: decide for every booking of the case
            decision = {"choices": stand_in.group_choices(shared, case["bookings"])} if shared else None
            decision = decision or stand_in.single_choice(case)
            return server.answer(
                request, [{"type": "tool_use", "id": "toolu_decide", "name": "decide", "input": decision}]
            )
        return stand_in.answer(server, request)

    return respond


@pytest.mark.timeout(300)
def test_with_the_anthropic_reasoner_model_and_tool_calls_are_llm_and_tool_spans_of_the_trace(
    receiver: OtlpReceiver, messages_server: MessagesServer
) -> None:
    messages_server.auto(asks_then_decides(messages_server))
    env = {
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": messages_server.url,
        "BUSAGENTS_LLM_MAX_RETRIES": "0",
    }
    demo(receiver, "--reasoner", "anthropic", "--flights", "12", "--passengers", "600", env=env)
    assert messages_server.requests
    spans = receiver.snapshot()
    trace = check_one_passengers_path(spans, with_span="TOOL")  # feed to notifier, as with the offline reasoner
    by_id = {s.span_id: s for s in trace}
    llm = [s for s in trace if s.attributes.get("openinference.span.kind") == "LLM" and s.name.startswith("chat ")]
    assert llm
    for call in llm:
        assert call.kind == "CLIENT" and call.service == "flight-reasoner"
        assert call.attributes["gen_ai.operation.name"] == "chat"
        assert call.attributes["gen_ai.provider.name"] == "anthropic"
        assert call.attributes["gen_ai.usage.input_tokens"] > 0
        assert call.attributes["gen_ai.usage.output_tokens"] > 0
        assert call.attributes["llm.token_count.total"] > 0
        agent = by_id[call.parent_span_id]  # the model call is part of the agent's decision of a handled message
        assert agent.attributes["openinference.span.kind"] == "AGENT"
        ancestors = []
        while agent.parent_span_id:
            agent = by_id[agent.parent_span_id]
            ancestors.append((agent.kind, agent.service))
        assert ("CONSUMER", "flight-reasoner") in ancestors  # the handled disruption
    tools = [s for s in trace if s.attributes.get("openinference.span.kind") == "TOOL"]
    for tool in tools:
        assert tool.service == "flight-reasoner" and tool.attributes["gen_ai.tool.name"] == "alternatives"
        (query,) = [s for s in trace if s.parent_span_id == tool.span_id]  # the tool asks the bus
        assert query.kind == "CLIENT"
        assert [s.service for s in trace if s.parent_span_id == query.span_id] == ["flight-context"]
