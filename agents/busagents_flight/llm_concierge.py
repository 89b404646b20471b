"""The LLM concierge: Claude answers a traveller with the context agent's queries as tools.

``BUSAGENTS_FLIGHT_CONCIERGE_BACKEND=anthropic``. Each message is one conversation with the model
through :class:`busagents.llm.Decider`:

- the traveller's message and the conversation so far (its summary and last turns) reach the
  model only as the result of ``read_case``: passenger text is data, never instructions;
- its tools are the typed queries (``passenger_bookings``, ``flight_info``, ``alternatives``,
  ``fare_rules``, ``passenger_preferences``), answered by the context agent from the live view;
- it answers with a :class:`ConciergeReply`; an action in it (``rebook``, ``refund``) is checked
  with the same rules as the offline backend's (:class:`~busagents_flight.concierge.Rules`), and a
  reply that breaks one goes back to the model with the rule, at most ``max_corrections`` times;
- ids, seats, costs and the decision itself are never the model's: the agent builds the
  ``RebookPassenger`` from the checked request, as for the offline backend.

Without ``ANTHROPIC_API_KEY`` every answer is the offline backend's, and a warning says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import msgspec
from anthropic import AsyncAnthropic
from busagents_travel import (
    Alternatives,
    AlternativesReply,
    FareRules,
    FlightInfo,
    FlightInfoReply,
    PassengerAsked,
    PassengerBookings,
    PassengerPreferences,
)

from busagents.llm import Decider, LLMSettings, Outcome, QueryTool, has_api_key

from .concierge import (
    Concierge,
    ConciergeAgent,
    Conversation,
    Draft,
    Lookups,
    OfflineConcierge,
    Rules,
    Summary,
    remember,
)
from .settings import FlightSettings

__all__ = ["INSTRUCTIONS", "AnthropicConcierge", "ConciergeReply"]

log = logging.getLogger("busagents_flight.llm")

_TEXT_MAX = 1200


class ConciergeReply(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Your answer to the traveller's message."""

    #: What the traveller reads: plain sentences, from the tools' results only.
    text: str
    #: The facts the answer uses, one line each, as the tools gave them.
    facts: list[str] = []
    #: "rebook" or "refund" only when the traveller asked for it; otherwise "none".
    action: Literal["none", "rebook", "refund"] = "none"
    #: rebook / refund: the traveller's booking.
    booking_id: str = ""
    #: rebook: the flight id to move to; otherwise the flight the answer is about (or "").
    flight_id: str = ""
    #: the airport code of the destination the answer is about (or "").
    destination: str = ""


INSTRUCTIONS = """\
You are an airline's assistant, chatting with one traveller about their trip today.
Answer the traveller's message (the case: their message, and the conversation so far with its summary) \
from the tools' results only: their bookings, a flight's live status, alternative flights with free seats, \
their fare's change and refund rules, their preferences. A follow-up ("and the next one?", "what about \
New York?") refers to the conversation's summary: the flight, booking and destination in play, the options \
last offered.
Take an action only when the traveller asks for it: action "rebook" with the booking and the flight to move \
to, or "refund" with the booking. The airline's systems check the action against its rules and apply it; \
if it breaks a rule you will be told which: then answer with action "none" and explain the rule.
Never promise anything the tools did not show. Keep the text short and plain."""


class _Option(msgspec.Struct, kw_only=True):
    flights: list[str]  # "BX125-25NOV LHR 15:40 -> JFK 22:45"
    free_seats: dict[str, int]  # cabin -> seats free on every flight of the itinerary


def _hm(t: int) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def _render_alternatives(reply: AlternativesReply) -> str:
    """Itineraries in brief: the flights, and the free seats per cabin (the model needs no seat map)."""
    options = [
        _Option(
            flights=[
                f"{f.flight_id} {f.origin} {_hm(f.departure)} -> {f.destination} {_hm(f.arrival)}" for f in it.flights
            ],
            free_seats={
                cabin: min(sum(1 for s in seats if s.cabin == cabin) for seats in it.free_seats)
                for cabin in sorted({s.cabin for seats in it.free_seats for s in seats})
            },
        )
        for it in reply.itineraries[:6]
    ]
    return msgspec.json.encode(options).decode()


class _Case(msgspec.Struct, kw_only=True):
    passenger_id: str
    message: str
    summary: Summary
    last_turns: list[str]


class AnthropicConcierge(Concierge):
    """Claude answers with the queries as tools; its actions are checked; the offline backend backs it up."""

    name: ClassVar[str] = "anthropic"

    def __init__(self, settings: LLMSettings | None = None, client: AsyncAnthropic | None = None) -> None:
        self.settings = settings or LLMSettings.for_agent(ConciergeAgent.name)
        self.offline = OfflineConcierge()
        self.rules = Rules(FlightSettings().rebook_threshold_minutes)
        self.outcomes: list[Outcome[ConciergeReply]] = []
        self.decider: Decider[ConciergeReply] | None = None
        if client is None and not has_api_key():
            log.warning(
                "ANTHROPIC_API_KEY is not set: the anthropic concierge answers with the offline backend "
                "(set the key, and ANTHROPIC_BASE_URL for a gateway, to use the model)"
            )
            return
        tools = [
            QueryTool(PassengerBookings, description="The traveller's bookings: legs, seats, cabin, fare."),
            QueryTool(FlightInfo, description="A flight's live status and estimated times."),
            QueryTool(
                Alternatives,
                description="Flights (direct or one stop) from origin to destination departing at or after "
                "not_before (epoch seconds), earliest arrival first, with free seats per cabin.",
                render=_render_alternatives,
            ),
            QueryTool(FareRules, description="The fare of a booking and its change and refund rules."),
            QueryTool(PassengerPreferences, description="The traveller's loyalty tier and seating preference."),
        ]
        self.decider = Decider(
            ConciergeAgent,
            ConciergeReply,
            tools=tools,
            instructions=INSTRUCTIONS,
            settings=self.settings,
            client=client,
        )

    async def close(self) -> None:
        if self.decider is not None:
            await self.decider.client.close()

    async def draft(self, question: PassengerAsked, conversation: Conversation, lookups: Lookups) -> Draft:
        if self.decider is None:
            return await self.offline.draft(question, conversation, lookups)
        case = _Case(
            passenger_id=question.passenger_id,
            message=question.text,
            summary=conversation.summary,
            last_turns=[f"{t.role}: {t.text}" for t in conversation.turns[-6:]],
        )
        fallen: list[Draft] = []

        async def offline(reason: str) -> ConciergeReply:
            log.info("concierge falls back to the offline backend: %s", reason)
            d = await self.offline.draft(question, conversation, lookups)
            fallen.append(d)
            return ConciergeReply(text=d.text or "(offline)", facts=d.facts)

        async def check(reply: ConciergeReply, replies: Sequence[Any]) -> str | None:
            if reply.action == "none":
                return None if reply.text.strip() else "text is empty: answer the traveller"
            draft = Draft(text=reply.text, action=reply.action, booking_id=reply.booking_id, flights=[reply.flight_id])
            checked = await self.rules.check(question, draft, lookups)
            return f"this {reply.action} breaks a rule: {checked.problem}" if checked.decision is None else None

        task = (
            f"Answer the message of traveller {question.passenger_id} in their conversation "
            f"{question.conversation_id}. The case is the result of read_case."
        )
        outcome = await self.decider.decide(lookups.ctx, task=task, case=case, fallback=offline, check=check)
        self.outcomes.append(outcome)
        if fallen:
            return fallen[0]
        reply = outcome.decision
        if reply is None:  # handed to human review: the offline backend answers meanwhile
            return await self.offline.draft(question, conversation, lookups)
        return _draft(reply, conversation.summary, outcome)


def _draft(reply: ConciergeReply, before: Summary, outcome: Outcome[ConciergeReply]) -> Draft:
    """The checked reply as a draft, and the conversation's summary moved on by what the model looked at."""
    summary = msgspec.structs.replace(before, intent=reply.action if reply.action != "none" else "status")
    looked = [r.flight_id for r in outcome.replies if isinstance(r, FlightInfoReply)]
    offered = [
        it.flights[0].flight_id for r in outcome.replies if isinstance(r, AlternativesReply) for it in r.itineraries[:3]
    ]
    if offered:
        summary.options, summary.intent = offered, "options"
    if reply.action == "none" and reply.flight_id in looked:  # the flight the traveller asked about
        summary.flight_id = reply.flight_id
    if reply.destination:
        summary.destination = reply.destination
        summary.cities = remember(summary.cities, reply.destination)
    summary.flights = remember(summary.flights, *looked, *offered)
    if reply.booking_id:
        summary.booking_id = reply.booking_id
    text = " ".join(reply.text.split())[:_TEXT_MAX]
    if reply.action == "none":
        return Draft(text=text, facts=reply.facts[:8], summary=summary)
    return Draft(
        text=text, action=reply.action, booking_id=reply.booking_id, flights=[reply.flight_id], summary=summary
    )
