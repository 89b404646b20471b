"""The concierge: a traveller's conversation with the flight assistant, as one more agent on the bus.

``PassengerAsked`` in, ``PassengerAnswered`` out. What it knows of the day it asks the context
agent for, with typed queries (``PassengerBookings``, ``FlightInfo``, ``Alternatives``,
``FareRules``, ``PassengerPreferences``), each answered from a view caught up with the event
stream; it never reads a store. What it does goes through the contracts the swarm already
validates: a change or a refund becomes a ``RebookPassenger`` (``reasoner="concierge"``),
checked here against the policy's rules (the journey kept, the booked cabin, a free seat per
passenger, the fare's refund rule), held by the approval gate when it costs more than the
threshold, applied by the rebooker; the answer says what happened once its ``BookingsChanged``
or ``RebookRejected`` arrived, or honestly that it is pending.

The conversation lives in the ``flight-concierge`` key-value bucket under its id, the last
:data:`TURNS` turns plus a running :class:`Summary` (the passenger, the booking and flight in
play, the cities, the options last offered), written with compare-and-set: a follow-up that
says only "and the next one?" is understood by any replica, also after a restart. The notices
the passenger was sent since their last message come into the conversation when they next write:
the context agent's ``PassengerBookings`` reply lists the changes made to their bookings, each
told to them by the notifier, and the concierge keeps those it has not kept yet as notice turns
(the notifier's text), before it answers. So "put me on the earlier one" after a notice is
understood, and a day of notices costs the concierge nothing: most passengers a storm reaches
never write.

Backends (``BUSAGENTS_FLIGHT_CONCIERGE_BACKEND``): ``offline`` (default) answers the common intents
deterministically; ``anthropic`` lets Claude use the queries as tools through
:class:`busagents.llm.Decider`. Either way, passenger text is data, and an action is taken only
once the rules here accepted it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import msgspec
import nats.errors
from busagents_travel import (
    AlternativeItinerary,
    Alternatives,
    Booking,
    BookingChanged,
    BookingsChanged,
    Cost,
    Disruption,
    FareRules,
    FareRulesReply,
    FlightInfo,
    FlightInfoReply,
    Leg,
    PassengerAnswered,
    PassengerAsked,
    PassengerBookings,
    PassengerBookingsReply,
    PassengerPreferences,
    RebookPassenger,
    RebookRejected,
)
from nats.aio.msg import Msg
from pydantic_settings import BaseSettings, SettingsConfigDict

from busagents import Agent, ConfigError, Context, StateConflictError, on
from busagents.codec import codec_for
from busagents.contract import contract_info
from busagents.llm import ApprovalDecided, ApprovalRequested, LLMSettings, ReviewRequested

from .approval import Approvals
from .notifier import render
from .policy import choose_seats
from .settings import FlightSettings

__all__ = [
    "DECISION_PREFIX",
    "NOTICED",
    "TURNS",
    "Checked",
    "Concierge",
    "ConciergeAgent",
    "ConciergeSettings",
    "Conversation",
    "Draft",
    "Lookups",
    "OfflineConcierge",
    "Rules",
    "Summary",
    "Turn",
    "conversation_of",
    "flight_fact",
    "load_concierge",
    "outcome_text",
    "remember",
]

log = logging.getLogger("busagents_flight.concierge")

#: The id of every decision the concierge makes starts so: its rejections are the concierge's to tell.
DECISION_PREFIX = "concierge/"
#: Turns a conversation keeps (older ones live on in the summary).
TURNS = 12
#: Notices whose decision ids a conversation remembers, so that none comes in twice.
NOTICED = 64
_KEPT = 8  # flights and cities the summary keeps
_BUCKET = "flight-concierge"
_KEY = re.compile(r"^[-_=a-zA-Z0-9]+$")


class ConciergeSettings(BaseSettings):
    """``BUSAGENTS_FLIGHT_CONCIERGE_BACKEND`` and ``BUSAGENTS_FLIGHT_CONCIERGE_OUTCOME_TIMEOUT``."""

    model_config = SettingsConfigDict(env_prefix="BUSAGENTS_FLIGHT_CONCIERGE_", extra="ignore")

    #: ``offline`` (deterministic, the default) or ``anthropic`` (Claude with the queries as tools).
    backend: str = "offline"

    #: Seconds an answer waits for the rebooker's outcome of its action before it says "pending".
    outcome_timeout: float = 10.0


# The conversation's memory


class Turn(msgspec.Struct, kw_only=True):
    """One message of a conversation: the traveller's, the assistant's, or a notice of the airline's."""

    role: Literal["passenger", "assistant", "notice"]
    text: str
    question_id: str = ""
    facts: list[str] = []
    action: str = ""
    outcome: str = ""
    at: float = 0.0
    booking_id: str = ""  # a notice: the booking it is about


class Summary(msgspec.Struct, kw_only=True):
    """What a follow-up may refer to: the running state of the conversation."""

    name: str = ""
    booking_id: str = ""  # the booking in play
    flight_id: str = ""  # the flight in play (asked about, or the one a notice put them on)
    destination: str = ""  # airport code the traveller is going to, in play
    flights: list[str] = []  # flight ids mentioned, most recent last
    cities: list[str] = []  # airport codes mentioned, most recent last
    options: list[str] = []  # flight ids last offered, in order
    intent: str = ""  # the last intent: status, options, rebook, refund


class Conversation(msgspec.Struct, kw_only=True):
    """A conversation as the bucket keeps it: bounded, whatever its length."""

    conversation_id: str
    passenger_id: str
    turns: list[Turn] = []
    summary: Summary = msgspec.field(default_factory=Summary)
    count: int = 0  # turns ever
    noticed: list[str] = []  # the decision ids of the notices kept, the last NOTICED of them

    def add(self, *turns: Turn) -> None:
        self.turns = [*self.turns, *turns][-TURNS:]
        self.count += len(turns)
        ids = [t.question_id for t in turns if t.role == "notice" and t.question_id not in self.noticed]
        if ids:
            self.noticed = [*self.noticed, *ids][-NOTICED:]

    def answered(self, question_id: str) -> Turn | None:
        return next((t for t in self.turns if t.role == "assistant" and t.question_id == question_id), None)


def conversation_of(passenger_id: str) -> str:
    """The conversation id of a passenger's chat (the one notices are kept in)."""
    return f"chat-{passenger_id}"


def _state_key(conversation_id: str) -> str:
    if _KEY.match(conversation_id) and len(conversation_id) <= 200:
        return conversation_id
    return "c-" + hashlib.sha256(conversation_id.encode()).hexdigest()[:32]


def remember(items: list[str], *new: str) -> list[str]:
    kept = [i for i in items if i not in new]
    return [*kept, *(n for n in new if n)][-_KEPT:]


# Live context, through the context agent's queries


class Lookups:
    """The typed queries one answer makes, cached for the answer, with the facts they gave."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._flights: dict[str, FlightInfoReply] = {}
        self._bookings: dict[str, PassengerBookingsReply] = {}

    async def bookings(self, passenger_id: str) -> PassengerBookingsReply:
        if passenger_id not in self._bookings:
            self._bookings[passenger_id] = await self.ctx.request(PassengerBookings(passenger_id=passenger_id))
        return self._bookings[passenger_id]

    async def flight(self, flight_id: str) -> FlightInfoReply:
        if flight_id not in self._flights:
            self._flights[flight_id] = await self.ctx.request(FlightInfo(flight_id=flight_id))
        return self._flights[flight_id]

    async def fare(self, booking_id: str) -> FareRulesReply:
        reply: FareRulesReply = await self.ctx.request(FareRules(booking_id=booking_id))
        return reply

    async def alternatives(
        self, origin: str, destination: str, not_before: int, *, exclude: list[str], cabin: str | None, seats: int
    ) -> list[AlternativeItinerary]:
        q = Alternatives(
            origin=origin,
            destination=destination,
            not_before=not_before,
            exclude=exclude,
            cabin=cabin,
            min_free=seats,
            limit=12,
        )
        found: list[AlternativeItinerary] = (await self.ctx.request(q)).itineraries
        return found


def hm(t: int | None) -> str:
    return time.strftime("%H:%M", time.gmtime(t)) if t is not None else "?"


def _duration(minutes: int) -> str:
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes >= 60 else f"{minutes} min"


def flight_fact(info: FlightInfoReply) -> str:
    """One line on a flight's live status: "BX117 LHR->JFK delayed 3h10, now departs 14:40, arrives 22:10"."""
    f = info.flight
    if f is None:
        return f"{info.flight_id}: no such flight today"
    head = f"{f.number} {f.origin}->{f.destination}"
    if info.status == "cancelled":
        return f"{head} cancelled" + (f" ({info.reason})" if info.reason else "")
    times = f"departs {hm(info.estimated_departure)}, arrives {hm(info.estimated_arrival)}"
    if info.delay_minutes > 0:
        return f"{head} delayed {_duration(info.delay_minutes)}, now {times} (scheduled {hm(f.departure)})"
    state = {"scheduled": "on time", "delayed": "on time"}.get(info.status, info.status.replace("_", " "))
    return f"{head} {state}, {times}" + (f", gate {info.gate}" if info.gate else "")


def _option_fact(it: AlternativeItinerary, cabin: str) -> str:
    route = " + ".join(
        f"{f.number} {f.origin} {hm(f.departure)} -> {f.destination} {hm(f.arrival)}" for f in it.flights
    )
    free = min(sum(1 for s in seats if s.cabin == cabin) for seats in it.free_seats)
    return f"{route}: {free} seats free in cabin {cabin}"


# What a backend proposes


@dataclass
class Draft:
    """A backend's answer to one message, before any action is checked and taken."""

    text: str
    facts: list[str] = field(default_factory=list)
    action: Literal["", "rebook", "refund", "refused"] = ""
    booking_id: str = ""
    flights: list[str] = field(default_factory=list)  # rebook: the new flights, in order
    summary: Summary = field(default_factory=Summary)


class Concierge(abc.ABC):
    """Answers one traveller's message from the conversation so far and live context."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    async def draft(self, question: PassengerAsked, conversation: Conversation, lookups: Lookups) -> Draft:
        """The answer (and the action it asks for, if any) to ``question``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients (called when the agent stops)."""


# The offline backend: the common intents, deterministically

_FLIGHT_NO = re.compile(r"\b([A-Za-z]{2}\d{2,4})\b")
_REFUND = re.compile(r"\b(refund|money back|reimburse)", re.I)
_REBOOK = re.compile(
    r"\b(rebook|re-book|put me on|move me|switch me|book me on|change (?:me|my flight|to)|take (?:the|that|it))\b", re.I
)
_OPTIONS = re.compile(r"\b(next|earlier|later|other|another|alternatives?|options?)\b", re.I)
_STATUS = re.compile(r"\b(status|delay\w*|late|on time|when|depart\w*|arriv\w*|gate|cancel\w*|my flight)\b", re.I)
_EARLIER = re.compile(r"\b(earlier|before)\b", re.I)
_THAT = re.compile(r"\b(that one|it|the first|first one|this one)\b", re.I)
_MORE_THAN_ONCE = re.compile(r"\b(twice|double|two refunds|again|every|all)\b", re.I)


@dataclass
class _Focus:
    booking: Booking
    leg: Leg


class OfflineConcierge(Concierge):
    """Status of my flight, the next / earlier options, rebook to a named flight or "that one", refund."""

    name: ClassVar[str] = "offline"

    async def draft(self, question: PassengerAsked, conversation: Conversation, lookups: Lookups) -> Draft:
        mine = await lookups.bookings(question.passenger_id)
        summary = msgspec.structs.replace(conversation.summary)
        if mine.passenger is None:
            return Draft(text=f"I cannot find a booking for passenger {question.passenger_id} today.", summary=summary)
        summary.name = mine.passenger.name
        text = question.text
        place = _place(text, mine.cities)
        number = next((m.upper() for m in _FLIGHT_NO.findall(text)), None)
        intent = _intent(text, summary, place or number)
        focus = _focus(mine, summary, place, number)
        if focus is None:
            where = f" to {mine.cities.get(place, place)}" if place else ""
            active = [b for b in mine.bookings if b.status == "active"]
            if not active:
                return Draft(text="You have no active booking today.", summary=summary)
            return Draft(text=f"None of your bookings goes{where}.", summary=summary)
        summary.booking_id, summary.intent = focus.booking.booking_id, intent
        if intent == "refund":
            return self._refund(text, focus, summary)
        if intent == "rebook":
            return await self._rebook(text, focus, number, summary, lookups)
        if intent == "options":
            return await self._options(text, focus, summary, lookups)
        if intent == "status":
            return await self._status(focus, summary, lookups)
        return Draft(
            text=(
                "I can tell you the status of your flight, find the next or an earlier flight, move you to "
                "another flight, or refund your booking when its fare allows it."
            ),
            summary=summary,
        )

    async def _status(self, focus: _Focus, summary: Summary, lookups: Lookups) -> Draft:
        info = await lookups.flight(focus.leg.flight_id)
        fact = flight_fact(info)
        seats = ", ".join(focus.leg.seats)
        _focus_on(summary, focus.leg)
        summary.options = []
        return Draft(
            text=f"{fact}. You are in cabin {focus.leg.cabin}, seat {seats} (booking {focus.booking.booking_id}).",
            facts=[fact],
            summary=summary,
        )

    async def _pick(
        self, text: str, focus: _Focus, summary: Summary, lookups: Lookups
    ) -> tuple[list[AlternativeItinerary], str, FlightInfoReply]:
        """The direct flights before (``earlier``) or after the one in play, nearest first, with room."""
        reference = focus.leg.flight_id
        if summary.options and not _EARLIER.search(text):
            reference = summary.options[0]  # "and the next one?" after options: the one after those
        info = await lookups.flight(reference)
        leg = focus.leg
        departure = info.estimated_departure or leg.departure
        earlier = bool(_EARLIER.search(text))
        found = await lookups.alternatives(
            leg.origin,
            leg.destination,
            departure - 12 * 3600 if earlier else departure + 60,
            exclude=[leg.flight_id, reference],
            cabin=leg.cabin,
            seats=len(leg.seats),
        )
        direct = [it for it in found if len(it.flights) == 1]
        if earlier:
            direct = sorted(
                (it for it in direct if it.flights[0].departure < departure),
                key=lambda it: -it.flights[0].departure,
            )
        else:
            direct = sorted(direct, key=lambda it: it.flights[0].departure)
        return direct, "earlier" if earlier else "next", info

    async def _options(self, text: str, focus: _Focus, summary: Summary, lookups: Lookups) -> Draft:
        options, which, ref = await self._pick(text, focus, summary, lookups)
        leg = focus.leg
        after = ref.flight.number if ref.flight is not None else leg.number
        summary.destination = leg.destination
        if not options:
            return Draft(
                text=f"There is no {which} flight from {leg.origin} to {leg.destination} with "
                f"{len(leg.seats)} free seat(s) in cabin {leg.cabin} than {after}.",
                facts=[flight_fact(ref)],
                summary=summary,
            )
        shown = options[:3]
        first = shown[0].flights[0]
        facts = [_option_fact(it, leg.cabin) for it in shown]
        summary.options = [it.flights[0].flight_id for it in shown]
        summary.flights = remember(summary.flights, *summary.options)
        others = "; ".join(facts[1:])
        return Draft(
            text=(
                f"The {which} flight from {leg.origin} to {leg.destination} than {after} is {first.number}, "
                f"departing {hm(first.departure)} and arriving {hm(first.arrival)} ({facts[0].split(': ')[1]})."
                + (f" Also: {others}." if others else "")
                + f' Say "put me on {first.number}" to move there.'
            ),
            facts=facts,
            summary=summary,
        )

    async def _rebook(self, text: str, focus: _Focus, number: str | None, summary: Summary, lookups: Lookups) -> Draft:
        target: str | None = None
        if number is not None:
            target = next((f for f in summary.options + summary.flights if f.split("-")[0] == number), None)
            if target is None:
                suffix = focus.leg.flight_id.partition("-")[2]
                target = f"{number}-{suffix}" if suffix else number
        elif summary.options and (_THAT.search(text) or re.search(r"\bnext\b", text, re.I)):
            target = summary.options[0]  # the one just offered
        elif _OPTIONS.search(text):
            options, _, _ = await self._pick(text, focus, summary, lookups)
            target = options[0].flights[0].flight_id if options else None
        if target is None:
            return Draft(
                text="Which flight should I move you to? Ask me for the next or an earlier flight first.",
                summary=summary,
            )
        summary.options = []
        return Draft(text="", action="rebook", booking_id=focus.booking.booking_id, flights=[target], summary=summary)

    def _refund(self, text: str, focus: _Focus, summary: Summary) -> Draft:
        if _MORE_THAN_ONCE.search(text):
            return Draft(
                text="I cannot do that: a booking is refunded at most once, in full, and only under its fare's rules.",
                action="refused",
                booking_id=focus.booking.booking_id,
                summary=summary,
            )
        return Draft(text="", action="refund", booking_id=focus.booking.booking_id, summary=summary)


def _place(text: str, cities: dict[str, str]) -> str | None:
    """An airport the text names, by code ("JFK") or city ("New York")."""
    for code in re.findall(r"\b([A-Z]{3})\b", text):
        if code in cities:
            return str(code)
    lowered = text.lower()
    return next((code for code, city in cities.items() if re.search(rf"\b{re.escape(city.lower())}\b", lowered)), None)


def _intent(text: str, summary: Summary, named: str | None) -> str:
    if _REFUND.search(text):
        return "refund"
    if _REBOOK.search(text):
        return "rebook"
    if _OPTIONS.search(text):
        return "options"
    if _STATUS.search(text):
        return "status"
    if named or re.match(r"\s*(and|what about|how about)\b", text, re.I):
        return summary.intent if summary.intent in ("status", "options") else "status"  # a follow-up
    return "help"


def _focus(mine: PassengerBookingsReply, summary: Summary, place: str | None, number: str | None) -> _Focus | None:
    """The booking and leg the message is about: named by place or flight, else the one in play."""
    active = [b for b in mine.bookings if b.status == "active"]
    pairs = [(b, leg) for b in active for leg in b.legs]
    if place is not None:
        hit = next(((b, leg) for b, leg in pairs if leg.destination == place), None)
        hit = hit or next(((b, leg) for b, leg in pairs if leg.origin == place), None)
        return _Focus(*hit) if hit else None
    if number is not None:
        hit = next(((b, leg) for b, leg in pairs if leg.number == number), None)
        if hit:
            return _Focus(*hit)
    if summary.flight_id:
        hit = next(((b, leg) for b, leg in pairs if leg.flight_id == summary.flight_id), None)
        if hit:
            return _Focus(*hit)
    booking = next((b for b in active if b.booking_id == summary.booking_id), None) or (active[0] if active else None)
    if booking is None:
        return None
    leg = next((leg for leg in booking.legs if leg.destination == summary.destination), booking.legs[0])
    return _Focus(booking, leg)


def _focus_on(summary: Summary, leg: Leg) -> None:
    summary.flight_id = leg.flight_id
    summary.destination = leg.destination
    summary.flights = remember(summary.flights, leg.flight_id)
    summary.cities = remember(summary.cities, leg.origin, leg.destination)


# The rules an action must keep, whichever backend asked for it


@dataclass
class Checked:
    """A decision the rules accepted, or the rule it breaks."""

    decision: RebookPassenger | None = None
    problem: str = ""
    facts: list[str] = field(default_factory=list)


class Rules:
    """The policy's rules for a change or a refund a traveller asks for."""

    def __init__(self, threshold_minutes: int) -> None:
        self.threshold = threshold_minutes

    async def airline_caused(self, booking: Booking, lookups: Lookups) -> FlightInfoReply | None:
        """The flight of ``booking`` the airline cancelled or delayed beyond the threshold, if any."""
        for leg in booking.legs:
            info = await lookups.flight(leg.flight_id)
            if info.status == "cancelled" or info.delay_minutes >= self.threshold:
                return info
        return None

    async def check(self, question: PassengerAsked, draft: Draft, lookups: Lookups) -> Checked:
        mine = await lookups.bookings(question.passenger_id)
        booking = next((b for b in mine.bookings if b.booking_id == draft.booking_id), None)
        if booking is None:
            return Checked(problem=f"booking {draft.booking_id} is not one of yours: only your own bookings change")
        if booking.status != "active":
            return Checked(problem=f"booking {booking.booking_id} was refunded already: a booking is refunded once")
        if draft.action == "refund":
            return await self._refund(question, booking, lookups)
        return await self._rebook(question, booking, draft.flights, lookups)

    async def _refund(self, question: PassengerAsked, booking: Booking, lookups: Lookups) -> Checked:
        disrupted = await self.airline_caused(booking, lookups)
        fare = booking.fare
        n = len(booking.passengers)
        if disrupted is None and not fare.refundable:
            return Checked(
                problem=(
                    f"your fare ({fare.fare_class}) is non-refundable: a refund is given only when the airline "
                    f"cancels your flight or delays it by {_duration(self.threshold)} or more, and none of your "
                    "flights is"
                )
            )
        why = f"{flight_fact(disrupted)}; " if disrupted is not None else ""
        cost = Cost(refund=fare.price * n, waived=disrupted is not None, currency=fare.currency)
        decision = RebookPassenger(
            **_base(question, booking, disrupted, booking.legs[0]),
            action="refund",
            replaces=[leg.flight_id for leg in booking.legs],
            cost=cost,
            rationale=f"{why}refunded in full at the passenger's request ({fare.currency} {cost.refund / 100:,.2f})",
        )
        return Checked(decision=decision, facts=[flight_fact(disrupted)] if disrupted else [])

    async def _rebook(
        self, question: PassengerAsked, booking: Booking, flights: list[str], lookups: Lookups
    ) -> Checked:
        if len(flights) != 1:
            return Checked(problem="a change moves you to one flight on the same route")
        target = await lookups.flight(flights[0])
        new = target.flight
        if new is None:
            return Checked(problem=f"there is no flight {flights[0].split('-')[0]} today")
        leg = next(
            (leg for leg in booking.legs if (leg.origin, leg.destination) == (new.origin, new.destination)), None
        )
        if leg is None:
            route = ", ".join(f"{leg.origin}->{leg.destination}" for leg in booking.legs)
            return Checked(
                problem=f"{new.number} flies {new.origin}->{new.destination}, your booking {route}: "
                "a change keeps your journey's airports"
            )
        if leg.flight_id == new.flight_id:
            return Checked(problem=f"you are on {new.number} already")
        if target.status in ("cancelled", "departed", "arrived", "boarding"):
            return Checked(problem=f"{new.number} is {target.status}: a change needs a flight that has not left")
        n = len(booking.passengers)
        departure = target.estimated_departure or new.departure
        found = await lookups.alternatives(
            new.origin, new.destination, departure, exclude=[leg.flight_id], cabin=leg.cabin, seats=n
        )
        itinerary = next((it for it in found if [f.flight_id for f in it.flights] == [new.flight_id]), None)
        if itinerary is None:
            return Checked(
                problem=f"{new.number} has no {n} free seat(s) in cabin {leg.cabin}: a change keeps the booked "
                "cabin and needs a free seat for every passenger"
            )
        free = [s for s in itinerary.free_seats[0] if s.cabin == leg.cabin]
        seats = choose_seats(free, booking.passengers)
        if seats is None:
            return Checked(problem=f"{new.number} has no {n} free seat(s) in cabin {leg.cabin}")
        flown = itinerary.flights[0]
        new_leg = Leg(
            flown.flight_id,
            flown.number,
            flown.origin,
            flown.destination,
            flown.departure,
            flown.arrival,
            leg.cabin,
            seats,
        )
        disrupted = await self.airline_caused(booking, lookups)
        fare = booking.fare
        cost = Cost(change_fee=fare.change_fee * n, waived=disrupted is not None, currency=fare.currency)
        fee = (
            "change fee waived (airline-caused)"
            if cost.waived or not cost.change_fee
            else f"change fee {fare.currency} {cost.change_fee / 100:,.2f}"
        )
        decision = RebookPassenger(
            **_base(question, booking, disrupted, leg),
            action="rebook",
            replaces=[leg.flight_id],
            new_legs=[new_leg],
            cost=cost,
            rationale=(
                f"moved at the passenger's request from {leg.number} to {new.number} {new.origin} "
                f"{hm(flown.departure)} -> {new.destination} {hm(flown.arrival)}, seat(s) {', '.join(seats)} "
                f"in cabin {leg.cabin}; {fee}"
            ),
        )
        return Checked(decision=decision, facts=[flight_fact(target), _option_fact(itinerary, leg.cabin)])


def _base(question: PassengerAsked, booking: Booking, disrupted: FlightInfoReply | None, leg: Leg) -> dict[str, Any]:
    """The fields every concierge decision has: its id from the question's (a redelivery decides the same)."""
    flight = disrupted.flight if disrupted is not None else None
    cancelled = disrupted is not None and disrupted.status == "cancelled"
    disruption = Disruption(
        disruption_id=f"chat-{question.question_id}",
        kind="cancelled" if cancelled else "delayed",
        flight_id=flight.flight_id if flight else leg.flight_id,
        number=flight.number if flight else leg.number,
        origin=flight.origin if flight else leg.origin,
        destination=flight.destination if flight else leg.destination,
        observed_at=int(time.time()),
        delay_minutes=disrupted.delay_minutes if disrupted is not None else 0,
        reason="the passenger asked",
    )
    return {
        "decision_id": f"{DECISION_PREFIX}{question.question_id}",
        "disruption": disruption,
        "booking_id": booking.booking_id,
        "passenger_ids": [p.passenger_id for p in booking.passengers],
        "expected_version": booking.version,
        "reasoner": "concierge",
    }


# The agent


class ConciergeAgent(Agent):
    """``PassengerAsked`` -> ``PassengerAnswered``, remembering the conversation; acts through the rebooker."""

    name = "flight-concierge"
    interactive = True  # a traveller waits for each answer: swarm up keeps it the OS's normal scheduling
    produces = (
        PassengerAnswered,
        RebookPassenger,
        PassengerBookings,
        FlightInfo,
        Alternatives,
        FareRules,
        PassengerPreferences,
        ApprovalRequested,
        ReviewRequested,
    )
    #: The rebooker's outcome of its own decision, and a human's approval of a costly one.
    awaits = (BookingsChanged, RebookRejected, ApprovalDecided)
    state_buckets = (_BUCKET,)
    max_concurrency = 16

    def __init__(self, backend: Concierge | str | None = None, *, outcome_timeout: float | None = None) -> None:
        settings = ConciergeSettings()
        if backend is None:
            backend = settings.backend
        self.backend = load_concierge(backend) if isinstance(backend, str) else backend
        self.outcome_timeout = settings.outcome_timeout if outcome_timeout is None else outcome_timeout
        self.rules = Rules(FlightSettings().rebook_threshold_minutes)
        self.approvals = Approvals(LLMSettings.for_agent(self.name))
        self.answered = 0

    async def on_stop(self, ctx: Context) -> None:
        await self.backend.close()

    @on(PassengerAsked)
    async def asked(self, question: PassengerAsked, ctx: Context) -> None:
        memory = await ctx.state(_BUCKET, Conversation)
        key = _state_key(question.conversation_id)
        entry = await memory.entry(key)
        conversation = (
            entry.value
            if entry is not None
            else Conversation(conversation_id=question.conversation_id, passenger_id=question.passenger_id)
        )
        done = conversation.answered(question.question_id)
        if done is not None:  # redelivered after the answer was kept: the same answer again
            await ctx.publish(_answer(question, done), msg_id=f"answer.{question.question_id}")
            return
        lookups = Lookups(ctx)
        # the notices sent since the last message, in the conversation before the message is read
        news = _news(conversation, question.passenger_id, await lookups.bookings(question.passenger_id))
        seen = conversation
        if news:
            seen = msgspec.structs.replace(conversation)  # add() makes new lists: the read one stays as read
            seen.add(*news)
            for turn in news:
                seen.summary = _noticed(seen.summary, turn)
        draft = await self.backend.draft(question, seen, lookups)
        answer = await self._act(question, draft, lookups, ctx)
        turns = (
            *news,
            Turn(role="passenger", text=question.text[:2000], question_id=question.question_id, at=time.time()),
            Turn(
                role="assistant",
                text=answer.text,
                question_id=question.question_id,
                facts=answer.facts,
                action=answer.action,
                outcome=answer.outcome,
                at=time.time(),
            ),
        )
        await _keep(memory, key, conversation, entry.revision if entry else None, turns, draft.summary)
        await ctx.publish(answer, msg_id=f"answer.{question.question_id}")
        self.answered += 1

    async def _act(self, question: PassengerAsked, draft: Draft, lookups: Lookups, ctx: Context) -> PassengerAnswered:
        if draft.action not in ("rebook", "refund"):
            return _answered(question, draft.text, draft.facts, draft.action)
        checked = await self.rules.check(question, draft, lookups)
        if checked.decision is None:
            return _answered(question, f"I cannot do that: {checked.problem}.", checked.facts, "refused")
        decision = checked.decision
        held = await self.approvals.hold([decision], ctx)
        if held[0].action != decision.action:
            return _answered(
                question,
                "This change needs an airline agent's approval; it was not approved, so an agent will follow up.",
                checked.facts,
                decision.action,
                outcome="pending approval",
            )
        outcome = await self._apply(decision, ctx)
        return _answered(question, outcome_text(decision, outcome), checked.facts, decision.action, outcome=outcome)

    async def _apply(self, decision: RebookPassenger, ctx: Context) -> str:
        """Send the decision to the rebooker and wait for what it did (``pending`` after the timeout)."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        changed, rejected = contract_info(BookingsChanged), contract_info(RebookRejected)
        decode_changed, decode_rejected = codec_for(BookingsChanged).decode, codec_for(RebookRejected).decode

        async def on_changed(msg: Msg) -> None:
            group = decode_changed(msg.data)
            if group.group_id == decision.decision_id and group.changes and not done.done():
                done.set_result(_change_outcome(group.changes[0]))

        async def on_rejected(msg: Msg) -> None:
            r = decode_rejected(msg.data)
            if r.decision_id == decision.decision_id and not done.done():
                done.set_result(f"not done: {r.reason.replace('_', ' ')}" + (f" ({r.detail})" if r.detail else ""))

        nc = ctx.bus.nc
        subs = [
            await nc.subscribe(changed.subscribe_subject, cb=on_changed),
            await nc.subscribe(f"{rejected.subject}.{decision.booking_id}", cb=on_rejected),
        ]
        try:
            await nc.flush()
            await ctx.publish(decision, msg_id=f"concierge.{decision.decision_id}")
            try:
                return await asyncio.wait_for(done, self.outcome_timeout)
            except TimeoutError:
                return "pending"
        finally:
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()


def _kept(conversation: Conversation, turn: Turn) -> bool:
    """Whether ``turn`` (one with a question or decision id) is in ``conversation`` already."""
    if turn.role == "notice" and turn.question_id in conversation.noticed:
        return True
    return bool(turn.question_id) and any(
        t.role == turn.role and t.question_id == turn.question_id for t in conversation.turns
    )


def _news(conversation: Conversation, passenger_id: str, mine: PassengerBookingsReply) -> list[Turn]:
    """The notices of the changes to the passenger's bookings that ``conversation`` has not kept yet:
    each with the text the notifier sent this passenger."""
    news = []
    for change in mine.changes:
        index = next((i for i, p in enumerate(change.passengers) if p.passenger_id == passenger_id), None)
        if index is None:
            continue
        turn = Turn(
            role="notice",
            text=render(change, index)[1],
            question_id=change.decision_id,
            action=change.action,
            booking_id=change.booking_id,
            at=time.time(),
        )
        if not _kept(conversation, turn):
            news.append(turn)
    return news


def _noticed(summary: Summary, notice: Turn) -> Summary:
    """The summary once a notice is in the thread: its booking is the one in play."""
    return msgspec.structs.replace(summary, booking_id=notice.booking_id, flight_id="", options=[], intent="status")


async def _keep(
    memory: Any, key: str, conversation: Conversation, revision: int | None, turns: Sequence[Turn], summary: Summary
) -> None:
    """Append ``turns`` with compare-and-set; on a conflict, read again and append to what is there."""
    for _ in range(8):
        conversation.add(*turns)
        conversation.summary = summary
        try:
            if revision is None:
                await memory.create(key, conversation)
            else:
                await memory.update(key, conversation, revision=revision)
            return
        except StateConflictError:
            entry = await memory.entry(key)
            if entry is None:
                revision = None
                conversation = Conversation(
                    conversation_id=conversation.conversation_id, passenger_id=conversation.passenger_id
                )
            else:
                conversation, revision = entry.value, entry.revision
                # another writer may have kept the same turn meanwhile (a notice delivered twice)
                turns = [t for t in turns if not _kept(conversation, t)]
                if not turns:
                    return
    raise StateConflictError(f"conversation {key}: 8 writers got there first")


def _change_outcome(change: BookingChanged) -> str:
    if change.action == "refund":
        return f"refunded {change.cost.currency} {change.cost.refund / 100:,.2f}"
    legs = "; ".join(f"{leg.number} {leg.origin} {hm(leg.departure)} -> {leg.destination}" for leg in change.new_legs)
    seats = ", ".join(s for leg in change.new_legs[:1] for s in leg.seats)
    return f"rebooked on {legs}, seat {seats}" if change.action == "rebook" else "nothing changed"


def outcome_text(decision: RebookPassenger, outcome: str) -> str:
    """What the traveller reads once the rebooker answered (or did not, yet)."""
    if outcome == "pending":
        return (
            f"I have asked for the {decision.action} of booking {decision.booking_id}; it is pending: "
            "the booking system has not confirmed it yet. You will get a notice when it is done."
        )
    if outcome.startswith("not done"):
        return f"The {decision.action} of booking {decision.booking_id} was {outcome}."
    why = decision.rationale
    return f"Done: booking {decision.booking_id} {outcome}. {why[:1].upper()}{why[1:]}."


def _answered(
    question: PassengerAsked, text: str, facts: list[str], action: str, *, outcome: str = ""
) -> PassengerAnswered:
    return PassengerAnswered(
        question_id=question.question_id,
        conversation_id=question.conversation_id,
        passenger_id=question.passenger_id,
        text=text,
        facts=facts,
        action=action,
        outcome=outcome,
    )


def _answer(question: PassengerAsked, turn: Turn) -> PassengerAnswered:
    return _answered(question, turn.text, turn.facts, turn.action, outcome=turn.outcome)


# Backends by name


def load_concierge(name: str) -> Concierge:
    """The concierge backend ``offline`` or ``anthropic``."""
    if name == "offline":
        return OfflineConcierge()
    if name == "anthropic":
        from .llm_concierge import AnthropicConcierge

        backend: Concierge = AnthropicConcierge()
        return backend
    raise ConfigError(
        f"no concierge backend named {name!r} (known: anthropic, offline); see BUSAGENTS_FLIGHT_CONCIERGE_BACKEND"
    )
