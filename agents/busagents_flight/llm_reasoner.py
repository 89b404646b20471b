"""The LLM reasoner: Claude decides each affected booking with tool use; the offline policy backs it up.

Registered as ``anthropic`` (``busagents demo --reasoner anthropic``). For each affected
booking it holds one conversation with the model through :class:`busagents.llm.Decider`:

- the case (the disruption, the booking with its passengers' names and free-text note,
  the itineraries with their free seats) reaches the model only as a tool result;
- it may search further itineraries with the ``Alternatives`` query, a tool over the bus;
- it answers with a :class:`RebookingChoice` (action, flights, seats, hotel, rationale),
  which is checked here against the policy's hard rules (seats free and not given to
  another booking, the journey right, no refund while a rebooking exists, no downgrade
  while the booked cabin has room) and corrected by the model or replaced by the
  offline policy's decision, which then says why;
- ids, booking versions and costs are never the model's: they come from the case and
  the fare's change policy, exactly as the offline policy computes them.

Without ``ANTHROPIC_API_KEY`` (or ``ANTHROPIC_AUTH_TOKEN``) every decision is the offline
policy's, and a warning says so. Settings: ``BUSAGENTS_LLM_*`` / ``BUSAGENTS_LLM_FLIGHT_REASONER_*``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import msgspec
from anthropic import AsyncAnthropic
from busagents_travel import AlternativeItinerary, Alternatives, AlternativesReply, Leg, Passenger, RebookPassenger
from busagents_travel.model import CabinCode, Seat

from busagents import Context
from busagents.llm import Decider, LLMSettings, Outcome, QueryTool, has_api_key

from .policy import OfflinePolicy, _priority
from .reasoner import ReasonerAgent
from .reasoning import AffectedBooking, Case, Lookup, Reasoner

__all__ = ["INSTRUCTIONS", "AnthropicReasoner", "RebookingChoice"]

log = logging.getLogger("busagents_flight.llm")

_CABIN_RANK = {"Y": 0, "W": 1, "J": 2, "F": 3}
_SEATS_SHOWN = 12  # free seats shown per cabin and flight
_OPTIONS_SHOWN = 6  # itineraries shown per case or search
_RATIONALE_MAX = 400
_IMPROVEMENT = 30 * 60  # policy rule 6: after a delay, rebook only onto an itinerary this much earlier


class RebookingChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Your decision for the one booking of the case."""

    booking_id: str
    action: Literal["rebook", "refund", "keep"]
    #: rebook: flight ids of the chosen itinerary, in order.
    flights: list[str] = []
    #: rebook: the cabin of the new seats.
    cabin: CabinCode | None = None
    #: rebook: per flight, one free seat per passenger, in the booking's passenger order.
    seats: list[list[str]] = []
    #: a hotel for stranded passengers facing an overnight wait.
    hotel: bool = False
    #: one or two plain sentences for the passengers.
    rationale: str


INSTRUCTIONS = """\
You re-accommodate the passengers of one airline booking after a flight disruption.
Policy, in this order:
1. Earliest arrival at the final destination among the itineraries you were given (earliest first); \
search more with the alternatives tool only if none has room.
2. Keep the booked cabin. An upgrade is fine; a downgrade only when no itinerary has room in the booked \
cabin or above.
3. Keep the booking's passengers together: same flights, one row or adjacent seats when possible.
4. Honour window / aisle preferences where the free seats allow.
5. Use only seats listed as free: one seat per passenger per flight, in the booking's passenger order.
6. After a long delay (why = long_delay), keep the booking unless an itinerary arrives at least 30 minutes \
before current_arrival.
7. Refund only when no itinerary has seats for every passenger. A hotel only for stranded passengers \
facing an overnight wait.
Fees, refunds and fare differences are computed by the airline's systems from the fare: you do not set them.
The rationale is shown to the passengers: one or two plain sentences about this decision, nothing else."""


class _FlightView(msgspec.Struct, kw_only=True):
    flight_id: str
    number: str
    origin: str
    destination: str
    departs: str
    arrives: str
    free_seats: dict[str, list[str]]  # cabin -> "12A window" (at most _SEATS_SHOWN each)


class _Option(msgspec.Struct, kw_only=True):
    arrives: str
    flights: list[_FlightView]


class _BookingCase(msgspec.Struct, kw_only=True):
    disruption: str
    booking_id: str
    why: str
    journey_from: str
    to: str
    earliest_departure: str
    current_arrival: str | None
    stranded: bool
    booked_cabin: str
    fare_class: str
    passengers: list[Passenger]
    passenger_note: str
    options: list[_Option]


def _time(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(t))


def _free_by_cabin(seats: list[Seat], taken: set[str], flight_id: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for seat in seats:
        if f"{flight_id}/{seat.number}" in taken:
            continue
        shown = out.setdefault(seat.cabin, [])
        if len(shown) < _SEATS_SHOWN:
            shown.append(f"{seat.number} {seat.position}")
    return out


def _options(itineraries: Sequence[AlternativeItinerary], taken: set[str]) -> list[_Option]:
    return [
        _Option(
            arrives=_time(it.arrival),
            flights=[
                _FlightView(
                    flight_id=f.flight_id,
                    number=f.number,
                    origin=f.origin,
                    destination=f.destination,
                    departs=_time(f.departure),
                    arrives=_time(f.arrival),
                    free_seats=_free_by_cabin(free, taken, f.flight_id),
                )
                for f, free in zip(it.flights, it.free_seats, strict=True)
            ],
        )
        for it in itineraries[:_OPTIONS_SHOWN]
    ]


def _cabin(affected: AffectedBooking) -> str:
    b = affected.booking
    return next((leg.cabin for leg in b.legs if leg.flight_id in affected.replaces), b.fare.cabin)


class AnthropicReasoner(Reasoner):
    """Claude decides each affected booking (tool use, validated choices); the offline policy backs it up."""

    name: ClassVar[str] = "anthropic"

    def __init__(self, settings: LLMSettings | None = None, client: AsyncAnthropic | None = None) -> None:
        self.settings = settings or LLMSettings.for_agent(ReasonerAgent.name)
        self.policy = OfflinePolicy()
        self.outcomes: list[Outcome[RebookingChoice]] = []
        self.decider: Decider[RebookingChoice] | None = None
        self._conversations = asyncio.Semaphore(self.settings.concurrency)
        if client is None and not has_api_key():
            log.warning(
                "ANTHROPIC_API_KEY is not set: the anthropic reasoner falls back to the offline policy "
                "for every decision (set the key, and ANTHROPIC_BASE_URL for a gateway, to use the model)"
            )
            return
        alternatives = QueryTool(
            Alternatives,
            description="Search further itineraries (direct or one stop) with free seats, earliest arrival first.",
            render=lambda reply: msgspec.json.encode(_options(reply.itineraries, set())).decode(),
        )
        self.decider = Decider(
            ReasonerAgent,
            RebookingChoice,
            tools=[alternatives],
            instructions=INSTRUCTIONS,
            settings=self.settings,
            client=client,
        )

    async def close(self) -> None:
        if self.decider is not None:
            await self.decider.client.close()

    async def decide(self, case: Case, lookup: Lookup) -> list[RebookPassenger]:
        """Without the agent's context there is no bus for the model's tools: the offline policy decides."""
        return [self._offline(d, "no bus context to reason with") for d in await self.policy.decide(case, lookup)]

    async def decide_in(self, ctx: Context, case: Case, lookup: Lookup) -> list[RebookPassenger]:
        if self.decider is None:
            return [self._offline(d, "ANTHROPIC_API_KEY not set") for d in await self.policy.decide(case, lookup)]
        taken = set(case.taken_seats)
        order = sorted(case.affected, key=_priority)  # higher tiers first, as the offline policy
        return list(await asyncio.gather(*(self._one(ctx, case, a, taken) for a in order)))

    @staticmethod
    def _offline(decision: RebookPassenger, reason: str) -> RebookPassenger:
        return msgspec.structs.replace(decision, rationale=f"{decision.rationale} [offline policy: {reason}]")

    async def _one(self, ctx: Context, case: Case, affected: AffectedBooking, taken: set[str]) -> RebookPassenger:
        # One conversation at a time per slot: its deadline starts when it does, and the case it
        # reads shows the seats that the bookings decided before it took.
        async with self._conversations:
            return await self._converse(ctx, case, affected, taken)

    async def _converse(self, ctx: Context, case: Case, affected: AffectedBooking, taken: set[str]) -> RebookPassenger:
        assert self.decider is not None
        booking = affected.booking
        d = case.disruption
        itineraries = case.alternatives.get(affected.search, [])
        if affected.why == "long_delay" and affected.current_arrival is not None:
            itineraries = [it for it in itineraries if it.arrival <= affected.current_arrival - _IMPROVEMENT]
        view = _BookingCase(
            disruption=(
                f"{d.number} {d.origin}-{d.destination} "
                + ("cancelled" if d.kind == "cancelled" else f"delayed {d.delay_minutes} min")
            ),
            booking_id=booking.booking_id,
            why=affected.why,
            journey_from=affected.origin,
            to=affected.destination,
            earliest_departure=_time(affected.not_before),
            current_arrival=_time(affected.current_arrival) if affected.current_arrival is not None else None,
            stranded=affected.stranded,
            booked_cabin=_cabin(affected),
            fare_class=booking.fare.fare_class,
            passengers=booking.passengers,
            passenger_note=booking.note,
            options=_options(itineraries, taken),
        )
        task = (
            f"Decide booking {booking.booking_id} ({len(booking.passengers)} passenger(s)), affected by the "
            f"disruption of flight {d.number}. The case is the result of read_case."
        )

        fallen: list[RebookPassenger] = []

        async def offline(reason: str) -> RebookingChoice:
            decision = self._offline(self.policy.decide_one(case, affected, taken), reason)
            fallen.append(decision)
            return _choice_of(decision)  # the outcome records what was decided

        async def check(choice: RebookingChoice, replies: Sequence[Any]) -> str | None:
            known = list(itineraries) + [
                it for r in replies if isinstance(r, AlternativesReply) for it in r.itineraries
            ]
            return self._check(choice, affected, known, taken)

        outcome = await self.decider.decide(ctx, task=task, case=view, fallback=offline, check=check)
        self.outcomes.append(outcome)
        if fallen:
            return fallen[0]
        choice = outcome.decision
        if choice is None:  # handed to human review: the passengers still get the policy's decision
            return self._offline(self.policy.decide_one(case, affected, taken), f"sent to review: {outcome.reason}")
        return self._apply(case, affected, choice, itineraries, outcome)

    def _check(
        self, choice: RebookingChoice, affected: AffectedBooking, known: list[AlternativeItinerary], taken: set[str]
    ) -> str | None:
        """A policy problem with ``choice``, or None; an accepted rebooking reserves its seats in ``taken``."""
        booking = affected.booking
        n = len(booking.passengers)
        if choice.booking_id != booking.booking_id:
            return f"booking_id must be {booking.booking_id}: decide this booking only"
        usable = [it for it in known if self._fits(it, affected)]
        roomy = [it for it in usable if any(_room(it, c, n, taken) for c in _CABIN_RANK)]
        if choice.action == "keep":
            if affected.why != "long_delay":
                return f"keep is not possible: the booking is {affected.why.replace('_', ' ')}; rebook or refund"
            return None
        if choice.action == "refund":
            if affected.why == "long_delay":
                return "after a delay the booking is kept or rebooked onto an earlier itinerary, not refunded"
            if roomy:
                ids = ", ".join(f.flight_id for f in roomy[0].flights)
                return f"a refund is only allowed when no itinerary has seats for all {n} passengers; {ids} has room"
            return None
        itinerary = next((it for it in usable if [f.flight_id for f in it.flights] == choice.flights), None)
        if itinerary is None:
            return (
                f"flights {choice.flights} are not an itinerary you were given from {affected.origin} to "
                f"{affected.destination} departing at or after {_time(affected.not_before)}"
            )
        if choice.cabin is None:
            return "cabin is required to rebook"
        late = affected.current_arrival
        if affected.why == "long_delay" and late is not None and itinerary.arrival > late - _IMPROVEMENT:
            arrives = _time(itinerary.arrival)
            return f"this itinerary arrives at {arrives}, not 30 min before {_time(late)}: keep the booking instead"
        booked = _cabin(affected)
        above = [c for c in _CABIN_RANK if _CABIN_RANK[c] >= _CABIN_RANK[booked]]
        if _CABIN_RANK[choice.cabin] < _CABIN_RANK[booked] and any(_room(itinerary, c, n, taken) for c in above):
            return f"cabin {choice.cabin} is a downgrade while {booked} or above has room on these flights"
        if len(choice.seats) != len(itinerary.flights) or any(len(s) != n for s in choice.seats):
            return f"seats must list, for each of the {len(itinerary.flights)} flight(s), one seat per passenger ({n})"
        wanted: list[str] = []
        for flight, free, seats in zip(itinerary.flights, itinerary.free_seats, choice.seats, strict=True):
            cabin_of = {s.number: s.cabin for s in free}
            for seat in seats:
                key = f"{flight.flight_id}/{seat}"
                if cabin_of.get(seat) != choice.cabin or key in taken:
                    return f"seat {seat} is not a free {choice.cabin} seat on {flight.flight_id}"
                wanted.append(key)
        if len(set(wanted)) != len(wanted):
            return "a seat is given twice"
        taken.update(wanted)  # reserved now: no other booking of this case can take them
        return None

    @staticmethod
    def _fits(it: AlternativeItinerary, affected: AffectedBooking) -> bool:
        return (
            bool(it.flights)
            and it.flights[0].origin == affected.origin
            and it.flights[-1].destination == affected.destination
            and it.flights[0].departure >= affected.not_before
            and not any(f.flight_id in affected.exclude for f in it.flights)
        )

    def _apply(
        self,
        case: Case,
        affected: AffectedBooking,
        choice: RebookingChoice,
        itineraries: list[AlternativeItinerary],
        outcome: Outcome[RebookingChoice],
    ) -> RebookPassenger:
        """The RebookPassenger of a checked choice: costs and ids by the policy, the choice and words by the model."""
        rationale = " ".join(choice.rationale.split())[:_RATIONALE_MAX]
        if choice.action == "keep":
            decision = self.policy.keep(case, affected)
        elif choice.action == "refund":
            decision = self.policy.refund(case, affected)
        else:
            assert choice.cabin is not None
            known = [*itineraries, *self._searched(outcome)]
            itinerary = next(it for it in known if [f.flight_id for f in it.flights] == choice.flights)
            legs = [
                Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, choice.cabin, seats)
                for f, seats in zip(itinerary.flights, choice.seats, strict=True)
            ]
            decision = self.policy.rebook(case, affected, itinerary, legs, _cabin(affected))
            if choice.hotel and affected.stranded:
                decision = msgspec.structs.replace(decision, hotel=True)
        return msgspec.structs.replace(decision, rationale=rationale or decision.rationale, reasoner=self.name)

    @staticmethod
    def _searched(outcome: Outcome[RebookingChoice]) -> list[AlternativeItinerary]:
        return [it for r in outcome.replies if isinstance(r, AlternativesReply) for it in r.itineraries]


def _room(it: AlternativeItinerary, cabin: str, n: int, taken: set[str]) -> bool:
    """True when every flight of ``it`` has ``n`` seats free in ``cabin``."""
    return all(
        sum(1 for s in free if s.cabin == cabin and f"{f.flight_id}/{s.number}" not in taken) >= n
        for f, free in zip(it.flights, it.free_seats, strict=True)
    )


def _choice_of(decision: RebookPassenger) -> RebookingChoice:
    """The choice a decision amounts to (to record the offline policy's decision on the outcome)."""
    legs = decision.new_legs
    return RebookingChoice(
        booking_id=decision.booking_id,
        action=decision.action,
        flights=[leg.flight_id for leg in legs],
        cabin=legs[0].cabin if legs else None,
        seats=[leg.seats for leg in legs],
        hotel=decision.hotel,
        rationale=decision.rationale,
    )
