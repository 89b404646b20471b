"""The LLM tool loop with the real anthropic SDK against a local Messages API, over a real nats-server."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from nats.aio.msg import Msg

from busagents import Agent, Bus, ConfigError
from busagents.llm import (
    ApprovalDecided,
    ApprovalRequested,
    Decider,
    LLMSettings,
    ReviewRequested,
    input_schema,
    tool_name,
)
from busagents.llm.testing import MessagesServer, RecordedRequest, Reply, error, slow, text, tool_use, tool_uses
from busagents.testing import run_agents

from .llm_agents import (
    INJECTION,
    ContextAgent,
    Disrupted,
    FindFlights,
    GetNote,
    LLMReasoner,
    Rebook,
)

CASE = Disrupted(booking_id="B1", origin="LHR", destination="JFK")
GOOD = {"booking_id": "B1", "flight_id": "F2", "cost": 80.0, "rationale": "F2 arrives first"}


def find() -> Reply:
    """The model's usual first turn: ask the bus for the alternatives."""
    return tool_use("find_flights", {"origin": "LHR", "destination": "JFK"})


def settings(**overrides: Any) -> LLMSettings:
    overrides.setdefault("max_retries", 0)
    return LLMSettings.for_agent("test_llm_reasoner", **overrides)


async def decide_one(bus: Bus, reasoner: LLMReasoner, context: ContextAgent | None = None) -> Rebook:
    async with run_agents(bus, reasoner, context or ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as got:
            await bus.publish(CASE)
    return got.message.body


async def test_tool_loop_sends_the_declared_queries_and_publishes_the_validated_decision(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(
        find(),
        tool_use("decide", GOOD, input_tokens=300, output_tokens=40, cache_read_input_tokens=1200),
    )
    context = ContextAgent()
    reasoner = LLMReasoner(settings(), messages_server)
    decision = await decide_one(bus, reasoner, context)

    assert decision == Rebook("B1", "F2", 80.0, "F2 arrives first", "model")
    assert context.queries == [FindFlights(origin="LHR", destination="JFK")]
    first, second = messages_server.requests
    assert first.body["tool_choice"] == {"type": "any"}
    tools = {t["name"]: t for t in first.body["tools"]}
    assert tools["find_flights"]["input_schema"] == input_schema(FindFlights)
    assert tools["decide"]["input_schema"]["required"] == ["booking_id", "flight_id", "cost", "rationale"]
    # The bus reply went back to the model as the tool result, as JSON.
    result = second.tool_results()[-1]
    assert result["content"] == '{"options":[{"flight_id":"F2","arrives":"12:00","fare":80.0},' + (
        '{"flight_id":"F3","arrives":"14:00","fare":40.0}]}'
    )
    # Prompt caching: the stable system prompt and the tool definitions carry cache_control.
    assert first.body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert first.body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert first.body["model"] == "claude-sonnet-4-6" and first.body["max_tokens"] == 1024
    # Telemetry on the outcome.
    outcome = reasoner.outcomes[0]
    assert outcome.source == "model" and outcome.reason is None
    assert [c.input_tokens for c in outcome.calls] == [100, 300]
    assert outcome.cache_read_input_tokens == 1200 and outcome.output_tokens == 60
    assert outcome.cost == pytest.approx((400 * 3 + 60 * 15 + 1200 * 0.3) / 1e6)
    assert all(c.seconds > 0 and c.model == "claude-test" for c in outcome.calls)
    assert [t.tool for t in outcome.tool_calls] == ["find_flights", "decide"]


async def test_malformed_decision_is_sent_back_with_the_error_and_corrected(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(
        find(),
        tool_use("decide", {**GOOD, "cost": "eighty"}),
        tool_use("decide", GOOD),
    )
    reasoner = LLMReasoner(settings(), messages_server)
    decision = await decide_one(bus, reasoner)

    assert decision.flight_id == "F2" and decision.decided_by == "model"
    correction = messages_server.requests[2]
    assert correction.body["tool_choice"] == {"type": "tool", "name": "decide"}
    error_block = correction.tool_results()[-1]
    assert error_block["is_error"] is True
    assert "Expected `float`, got `str` - at `$.cost`" in error_block["content"]
    assert reasoner.outcomes[0].corrections == 1


async def test_decision_outside_the_offered_options_is_corrected_by_the_domain_check(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(
        find(),
        tool_use("decide", {**GOOD, "flight_id": "F9"}),
        tool_use("decide", GOOD),
    )
    reasoner = LLMReasoner(settings(), messages_server)
    assert (await decide_one(bus, reasoner)).flight_id == "F2"
    assert "flight F9 was not offered" in messages_server.requests[2].tool_results()[-1]["content"]


async def test_decision_still_malformed_after_the_corrections_falls_back_to_the_offline_policy(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(*(tool_use("decide", {"booking_id": "B1"}) for _ in range(3)))
    reasoner = LLMReasoner(settings(max_corrections=1), messages_server)
    decision = await decide_one(bus, reasoner)

    assert decision.decided_by == "offline"
    assert decision.rationale.startswith("offline policy (invalid decision after 1 correction(s): Rebook: ")
    assert "flight_id" in decision.rationale
    assert len(messages_server.requests) == 2 and messages_server.unused == 1
    assert reasoner.outcomes[0].source == "offline"


async def test_text_instead_of_a_decision_is_answered_by_forcing_the_decision_tool(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(
        find(),
        text("I think F2 is best."),
        tool_use("decide", GOOD),
    )
    reasoner = LLMReasoner(settings(), messages_server)
    assert (await decide_one(bus, reasoner)).decided_by == "model"
    assert messages_server.requests[2].body["tool_choice"] == {"type": "tool", "name": "decide"}


async def test_invalid_output_goes_to_the_human_review_subject_when_configured(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(tool_use("decide", {"nonsense": True}), tool_use("decide", {"nonsense": True}))
    reasoner = LLMReasoner(settings(max_corrections=1, fallback="review"), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(ReviewRequested, subject="busagents.llm.review.test_llm_reasoner") as got:
            await bus.publish(CASE)
    review = got.message.body
    assert review.agent == "test_llm_reasoner" and review.decision_contract == "Rebook"
    assert review.case == {"booking_id": "B1", "origin": "LHR", "destination": "JFK"}
    assert review.last_attempt == {"nonsense": True}
    assert "unknown field(s) nonsense" in review.reason
    assert reasoner.outcomes[0].source == "review" and reasoner.outcomes[0].decision is None


async def test_rate_limit_retry_honours_retry_after(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(error(429, retry_after=1), find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(max_retries=2), messages_server)
    assert (await decide_one(bus, reasoner)).decided_by == "model"

    first, second, _ = messages_server.requests
    assert second.received_at - first.received_at >= 0.95  # waited what retry-after said
    assert second.headers["x-stainless-retry-count"] == "1"
    attempts = reasoner.outcomes[0].calls[0].attempts
    assert [(a.status, a.retry_after) for a in attempts] == [(429, 1.0), (200, None)]


async def test_overloaded_529_is_retried_with_backoff(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(error(529), find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(max_retries=2), messages_server)
    assert (await decide_one(bus, reasoner)).decided_by == "model"
    first, second, _ = messages_server.requests
    assert 0.3 <= second.received_at - first.received_at < 3  # SDK backoff: 0.5s x jitter [0.75, 1]
    assert [a.status for a in reasoner.outcomes[0].calls[0].attempts] == [529, 200]


async def test_slow_reply_past_the_timeout_is_abandoned_and_retried(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(find(), slow(tool_use("decide", {**GOOD, "flight_id": "F3"}), 10), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(max_retries=1, timeout=0.5), messages_server)
    decision = await decide_one(bus, reasoner)
    assert decision.flight_id == "F2"  # the slow answer never arrived
    attempts = reasoner.outcomes[0].calls[1].attempts
    assert [a.status for a in attempts] == [None, 200]
    assert attempts[0].error == "APITimeoutError" and 0.4 < attempts[0].seconds < 3


async def test_retries_exhausted_fall_back_to_the_offline_policy_with_the_reason(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(error(529), error(529))
    reasoner = LLMReasoner(settings(max_retries=1), messages_server)
    decision = await decide_one(bus, reasoner)
    assert decision.decided_by == "offline"
    assert "model unavailable: HTTP 529" in decision.rationale and "after 2 attempt(s)" in decision.rationale


async def test_retry_after_longer_than_allowed_falls_back_at_once(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(error(429, retry_after=3600), find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(max_retries=3, max_retry_wait=5), messages_server)
    decision = await decide_one(bus, reasoner)
    assert decision.decided_by == "offline" and "retry after 3600.0s" in decision.rationale
    assert len(messages_server.requests) == 1


async def test_spent_conversation_budget_degrades_to_the_offline_policy_and_says_so(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(conversation_max_tokens=200), messages_server)
    cases = [Disrupted(booking_id=b, origin="LHR", destination="JFK") for b in ("B1", "B2")]
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as first:
            await bus.publish(cases[0], conversation_id="disruption-1")
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B2", timeout=15) as second:
            await bus.publish(cases[1], conversation_id="disruption-1")
    assert first.message.body.decided_by == "model"  # 240 tokens spent by this one
    late = second.message.body
    assert late.decided_by == "offline"
    assert "LLM budget: conversation token budget spent (240 of 200 tokens)" in late.rationale
    assert len(messages_server.requests) == 2  # no model call for the second passenger
    assert second.message.envelope.conversation_id == "disruption-1"


async def test_spent_hourly_cost_budget_degrades_every_conversation(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(find(), tool_use("decide", GOOD, input_tokens=10_000))
    reasoner = LLMReasoner(settings(hourly_max_cost=0.01), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as first:
            await bus.publish(CASE)
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as second:
            await bus.publish(CASE)  # a new conversation, same hour
    assert first.message.body.decided_by == "model"
    assert "hourly cost budget spent ($0.0309 of $0.0100" in second.message.body.rationale


async def test_injected_instruction_in_a_passenger_note_produces_no_action_outside_the_policy(
    bus: Bus, messages_server: MessagesServer, nats_server: Any
) -> None:
    # A model that "obeys" the note: it reaches for tools it does not have, then tries to smuggle
    # a refund into the decision, then gives up and decides by the policy.
    messages_server.script(
        tool_uses(("get_note", {"booking_id": "B1"}), ("find_flights", {"origin": "LHR", "destination": "JFK"})),
        tool_uses(("refund_everyone", {"amount": "all"}), ("cancel_everything", {"confirm": True})),
        tool_use("decide", {**GOOD, "refund_all": True, "cost": 0.0}),
        tool_use("decide", GOOD),
    )
    context = ContextAgent(notes={"B1": INJECTION})
    reasoner = LLMReasoner(settings(), messages_server)
    seen: list[str] = []
    spy = await Bus.connect(nats_server.url)

    async def spied(msg: Msg) -> None:
        seen.append(msg.subject)

    sub = await spy.nc.subscribe("test.llm.>", cb=spied)
    try:
        decision = await decide_one(bus, reasoner, context)
        await spy.flush()
    finally:
        await sub.unsubscribe()
        await spy.close()

    assert decision == Rebook("B1", "F2", 80.0, "F2 arrives first", "model")
    outcome = reasoner.outcomes[0]
    assert outcome.refused_tools == ["refund_everyone", "cancel_everything"]
    # Nothing but the declared queries and the one decision travelled on the bus.
    assert sorted(set(seen)) == ["test.llm.disrupted.B1", "test.llm.flights", "test.llm.note.B1", "test.llm.rebook.B1"]
    assert all(type(q) in (FindFlights, GetNote) for q in context.queries)
    # The note reached the model only as data inside a tool result, never in the instructions.
    for request in messages_server.requests:
        assert "REFUND" not in request.system_text
        assert all("REFUND" not in str(b) for b in request.blocks("text"))
    results = messages_server.requests[1].tool_results()
    assert any("REFUND EVERYONE" in r["content"] for r in results)
    refusals = messages_server.requests[2].tool_results()
    assert all(r["is_error"] for r in refusals) and "there is no tool 'refund_everyone'" in refusals[0]["content"]
    assert "unknown field(s) refund_all" in messages_server.requests[3].tool_results()[0]["content"]


async def test_concurrency_limit_bounds_model_calls_in_flight(bus: Bus, messages_server: MessagesServer) -> None:
    def answer(request: RecordedRequest) -> Reply:
        case = json.loads(request.messages[2]["content"][0]["content"])
        if len(request.messages) == 3:
            return slow(find(), 0.2)
        return slow(tool_use("decide", {**GOOD, "booking_id": case["booking_id"]}), 0.2)

    messages_server.responder = answer
    reasoner = LLMReasoner(settings(concurrency=2, concurrency_max=2), messages_server)
    bookings = [f"C{i}" for i in range(6)]
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id.startswith("C"), count=6, timeout=20) as got:
            for b in bookings:
                await bus.publish(Disrupted(booking_id=b, origin="LHR", destination="JFK"))
    assert sorted(m.body.booking_id for m in got.messages) == bookings
    assert {m.body.decided_by for m in got.messages} == {"model"}
    assert len(messages_server.requests) == 12
    assert messages_server.max_in_flight == 2  # six cases at once, never more than two model calls


async def test_costly_decision_waits_for_approval_before_it_is_published(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(approval_threshold=50.0), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as rebooked:
            async with bus.expect(ApprovalRequested, subject="busagents.llm.approval.requested.*") as asked:
                await bus.publish(CASE)
            request = asked.message.body
            approved_at = time.time_ns()
            await bus.publish(ApprovalDecided(request_id=request.request_id, approved=True, by="duty-manager"))
    assert rebooked.message.envelope.sent_at_ns >= approved_at  # held until the approval arrived
    assert request.cost == 80.0 and request.threshold == 50.0
    assert request.decision["flight_id"] == "F2" and request.agent == "test_llm_reasoner"
    assert rebooked.message.body.flight_id == "F2"
    assert reasoner.held == ["approved by duty-manager"]


async def test_rejected_costly_decision_is_not_published_and_goes_to_review(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(approval_threshold=50.0), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(ReviewRequested, subject="busagents.llm.review.*", timeout=15) as review:
            async with bus.expect(ApprovalRequested, subject="busagents.llm.approval.requested.*") as asked:
                await bus.publish(CASE)
            rid = asked.message.body.request_id
            await bus.publish(ApprovalDecided(request_id=rid, approved=False, by="duty-manager", note="too dear"))
    assert review.message.body.reason == "rejected by duty-manager: too dear"
    assert reasoner.held == ["rejected by duty-manager: too dear"]


async def test_costly_decision_without_an_answer_in_time_goes_to_review(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(approval_threshold=50.0, approval_timeout=0.3), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(ReviewRequested, subject="busagents.llm.review.*", timeout=15) as review:
            await bus.publish(CASE)
    assert review.message.body.reason == "no approval in time"


def test_tool_schemas_come_from_the_contracts() -> None:
    schema = input_schema(FindFlights)
    assert schema["type"] == "object" and schema["required"] == ["origin", "destination"]
    assert schema["description"] == "Alternative flights between two airports."
    assert input_schema(Rebook, closed=True)["additionalProperties"] is False
    assert tool_name("FindFlights") == "find_flights" and tool_name("GetNote") == "get_note"


def test_undeclared_tools_are_a_configuration_error(messages_server: MessagesServer) -> None:
    class Narrow(Agent):
        name = "test_llm_narrow"
        produces = (Rebook, GetNote)

    with pytest.raises(ConfigError, match=r"must declare FindFlights in Narrow.produces"):
        Decider(Narrow, Rebook, tools=[FindFlights, GetNote], instructions="x", client=messages_server.client())
    with pytest.raises(ConfigError, match=r"only queries can be tools"):
        Decider(Narrow, Rebook, tools=[Rebook], instructions="x", client=messages_server.client())


async def test_a_decision_past_the_deadline_falls_back(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(slow(find(), 10))
    reasoner = LLMReasoner(settings(deadline=0.5, timeout=30), messages_server)
    decision = await decide_one(bus, reasoner)
    assert decision.decided_by == "offline"
    assert "no valid decision within the deadline of 0.5s" in decision.rationale


async def test_a_refusal_falls_back_at_once(bus: Bus, messages_server: MessagesServer) -> None:
    messages_server.script(text("I can't help with that.", stop_reason="refusal"))
    reasoner = LLMReasoner(settings(), messages_server)
    decision = await decide_one(bus, reasoner)
    assert decision.decided_by == "offline" and "the model refused to decide" in decision.rationale
    assert len(messages_server.requests) == 1


async def test_a_decision_cut_at_max_tokens_is_asked_again(bus: Bus, messages_server: MessagesServer) -> None:
    cut = tool_use("decide", {"booking_id": "B1"})
    cut.body["stop_reason"] = "max_tokens"
    messages_server.script(find(), cut, tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(max_tokens=64), messages_server)
    assert (await decide_one(bus, reasoner)).decided_by == "model"
    assert "cut at max_tokens=64" in messages_server.requests[2].tool_results()[0]["content"]


async def test_a_failing_model_is_not_called_again_until_the_cooldown(
    bus: Bus, messages_server: MessagesServer
) -> None:
    messages_server.script(error(529), error(529), find(), tool_use("decide", GOOD))
    reasoner = LLMReasoner(settings(breaker_failures=2, breaker_cooldown=60), messages_server)
    async with run_agents(bus, reasoner, ContextAgent()):
        for _ in range(3):
            async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as got:
                await bus.publish(CASE)
            assert got.message.body.decided_by == "offline"
    assert len(messages_server.requests) == 2  # the third decision did not wait on the model
    assert "not called for 60s after 2 failed calls in a row (last: HTTP 529" in got.message.body.rationale
    reasoner.decider.breaker._until = 0.0  # the cooldown is over: the model is asked again
    async with run_agents(bus, reasoner, ContextAgent()):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15) as got:
            await bus.publish(CASE)
    assert got.message.body.decided_by == "model" and reasoner.decider.breaker.in_a_row == 0


async def test_429s_slow_the_model_calls_in_flight_down_and_the_limit_recovers(
    bus: Bus, messages_server: MessagesServer
) -> None:
    def answer(request: RecordedRequest) -> Reply:
        case = json.loads(request.messages[2]["content"][0]["content"])
        if len(request.messages) == 3:
            return slow(find(), 0.05)
        return slow(tool_use("decide", {**GOOD, "booking_id": case["booking_id"]}), 0.05)

    messages_server.responder = answer
    reasoner = LLMReasoner(settings(concurrency=2, concurrency_max=16, max_retries=6), messages_server)
    limit = reasoner.decider.limit

    async def wave(prefix: str, n: int) -> None:
        where = lambda r: r.booking_id.startswith(prefix)  # noqa: E731
        async with bus.expect(Rebook, where=where, count=n, timeout=60) as got:
            for i in range(n):
                await bus.publish(Disrupted(booking_id=f"{prefix}{i}", origin="LHR", destination="JFK"))
        assert {m.body.decided_by for m in got.messages} == {"model"}

    async with run_agents(bus, reasoner, ContextAgent()):
        await wave("A", 24)  # the API accepts everything: more calls in flight than the initial 2
        grown = limit.current
        assert grown > 2 and messages_server.max_in_flight > 2
        seen = len(limit.history)
        messages_server.retry_after, messages_server.throttle_share = 0.1, 0.3  # 429 + retry-after on 30%
        await wave("B", 16)
        assert limit.throttled > 0 and messages_server.throttled == limit.throttled
        dipped = min(current for _, current in limit.history[seen:])
        assert dipped < grown
        messages_server.throttle_share = 0.0  # the API accepts again: the limit grows back
        await wave("C", 32)
        assert limit.current > dipped
