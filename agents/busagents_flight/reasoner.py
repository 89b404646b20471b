"""The reasoner agent: gathers a disruption's context over the bus and asks a Reasoner to decide.

It never reads a store: the affected bookings come from ``BookingsOnFlight``, the
itineraries from ``Alternatives``. Every decision is checked (one per affected
booking, seats free and not given twice) before it is published; a decision that
fails the check is replaced by the offline policy's. A ``RebookRejected`` (the
seat was sold meanwhile, or the booking moved on) is re-decided with what the
rebooker reported.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import msgspec
from busagents_travel import (
    MAX_SEARCHES,
    AlternativeItinerary,
    Alternatives,
    AlternativesMany,
    Booking,
    BookingsOnFlight,
    Disruption,
    DisruptionAssessed,
    Flight,
    FlightCancelled,
    FlightDelayed,
    ItineraryRef,
    RebookGroup,
    RebookPassenger,
    RebookRejected,
    Seat,
)

from busagents import Agent, Context, QueryFailedError, on
from busagents.llm import ApprovalDecided, ApprovalRequested, LLMSettings, ReviewRequested

from .approval import Approvals
from .concierge import DECISION_PREFIX
from .policy import OfflinePolicy, TakenSeats
from .reasoning import AffectedBooking, Case, Lookup, Reasoner, load_reasoner, search_key
from .settings import FlightSettings

__all__ = ["MAX_ATTEMPTS", "ReasonerAgent", "affected_booking"]

#: A booking re-decided this many times is kept as it is (and the passengers told so).
MAX_ATTEMPTS = 8
#: Itineraries asked for per search.
LIMIT = 12
_MIN = 60


class _SeatsGiven(msgspec.Struct):
    """Of a new leg of a decision: the seats it gives out."""

    flight_id: str
    seats: list[str]


class _DecisionSeats(msgspec.Struct):
    decision_id: str
    new_legs: list[_SeatsGiven] = []


class _GroupSeats(msgspec.Struct):
    """What the reasoner's view reads of a ``RebookGroup``: the seats each decision gives out (the
    rest of the group, a third of a 50-KB message or less, is skipped undecoded)."""

    decisions: list[_DecisionSeats]


class ReasonerAgent(Agent):
    r"""Turns ``FlightDelayed`` / ``FlightCancelled`` into one ``RebookPassenger`` per affected booking,
    sent in ``RebookGroup``\ s."""

    name = "flight-reasoner"
    produces = (
        RebookGroup,
        DisruptionAssessed,
        BookingsOnFlight,
        Alternatives,
        AlternativesMany,
        ApprovalRequested,
        ReviewRequested,
    )
    awaits = (ApprovalDecided,)  # Approvals: a costly decision waits for a human's answer
    max_concurrency = 8

    def __init__(self, reasoner: Reasoner | str | None = None) -> None:
        if reasoner is None:
            reasoner = FlightSettings().reasoner
        self.reasoner = load_reasoner(reasoner) if isinstance(reasoner, str) else reasoner
        self.fallback = OfflinePolicy()
        self.held: dict[str, set[str]] = defaultdict(set)  # seats given out (by any replica), by flight
        self.seats = SeatLists()  # free-seat lists of the context's replies, decoded once
        self.replaced = 0  # decisions of the backend that failed the check
        self.approvals = Approvals(LLMSettings.for_agent(self.name))  # costly decisions wait for a human
        self.reasoner.seats_given_out = self.given_out_on

    def given_out_on(self, flights: Iterable[str]) -> set[str]:
        """The seats given out by now on ``flights`` (by any replica), as "<flight_id>/<seat>"."""
        return {f"{fid}/{seat}" for fid in flights for seat in self.held.get(fid, ())}

    async def on_stop(self, ctx: Context) -> None:
        await self.reasoner.close()

    @on(FlightDelayed)
    async def delayed(self, event: FlightDelayed, ctx: Context) -> None:
        await self._assess(Disruption.of(event), ctx)

    @on(FlightCancelled)
    async def cancelled(self, event: FlightCancelled, ctx: Context) -> None:
        await self._assess(Disruption.of(event), ctx)

    @on(RebookGroup, view=True, read_as=_GroupSeats)
    async def given_out(self, group: _GroupSeats, ctx: Context) -> None:
        """Every replica reads every group, its own and the others': the seats any replica gave out
        are held here too, so that replicas seldom offer the same seat twice (what is left is two
        decisions made in the same few milliseconds; the rebooker refuses the second). A replica
        that starts or restarts mid-day replays the day's groups before it decides anything."""
        self.hold(group.decisions)

    def hold(self, decisions: Sequence[RebookPassenger | _DecisionSeats]) -> None:
        """Count the seats of ``decisions`` as given out."""
        for decision in decisions:
            for leg in decision.new_legs:
                self.held[leg.flight_id].update(leg.seats)

    @on(RebookRejected)
    async def rejected(self, rejection: RebookRejected, ctx: Context) -> None:
        if rejection.decision_id.startswith(DECISION_PREFIX):
            return  # a change a traveller asked the concierge for: the concierge tells them, nothing to re-decide
        d = rejection.disruption
        for seat in rejection.taken_seats:
            flight_id, _, number = seat.partition("/")
            self.held[flight_id].add(number)
        reply = await ctx.request(BookingsOnFlight(flight_id=d.flight_id))
        booking = rejection.current
        if booking is None:
            booking = next((b for b in reply.bookings if b.booking_id == rejection.booking_id), None)
        attempt = rejection.attempt + 1
        affected = affected_booking(d, booking, reply.mct_minutes) if booking is not None else None
        if affected is None or attempt > MAX_ATTEMPTS:
            note = (
                "the booking was already changed for another disruption"
                if attempt <= MAX_ATTEMPTS
                else f"no seat could be confirmed after {MAX_ATTEMPTS} attempts; an agent will follow up"
            )
            keep = RebookPassenger(
                decision_id=f"{d.disruption_id}/{rejection.booking_id}/{attempt}",
                disruption=d,
                booking_id=rejection.booking_id,
                action="keep",
                passenger_ids=rejection.passenger_ids,
                rationale=f"{d.number}: {note}",
                attempt=attempt,
                reasoner=self.fallback.name,
            )
            await _publish_all(ctx, [keep])
            return
        await _publish_all(ctx, await self._decide(d, [affected], ctx, attempt))

    async def _assess(self, d: Disruption, ctx: Context) -> None:
        reply = await ctx.request(BookingsOnFlight(flight_id=d.flight_id))
        bookings = [b for b in reply.bookings if b.booking_id in d.bookings] if d.bookings else reply.bookings
        affected = [a for b in bookings if (a := affected_booking(d, b, reply.mct_minutes)) is not None]
        decisions = await self._decide(d, affected, ctx, 1) if affected else []
        await ctx.publish(
            DisruptionAssessed(
                disruption_id=d.disruption_id,
                flight_id=d.flight_id,
                affected_bookings=len(affected),
                affected_passengers=sum(len(a.booking.passengers) for a in affected),
            ),
            msg_id=f"assessed.{d.disruption_id}",
        )
        await _publish_all(ctx, decisions)

    async def _decide(
        self, d: Disruption, affected: list[AffectedBooking], ctx: Context, attempt: int
    ) -> list[RebookPassenger]:
        cache: dict[str, list[AlternativeItinerary]] = {}

        async def lookup(
            origin: str, destination: str, not_before: int, exclude: list[str]
        ) -> list[AlternativeItinerary]:
            key = search_key(origin, destination, not_before, exclude)
            if key not in cache:
                q = Alternatives(
                    origin=origin, destination=destination, not_before=not_before, exclude=exclude, limit=LIMIT
                )
                reply = await ctx.request(q, reply_as=_AlternativesSeen)
                cache[key] = [
                    AlternativeItinerary(
                        flights=it.flights, free_seats=[self.seats.of(raw) for raw in it.free_seats], arrival=it.arrival
                    )
                    for it in reply.itineraries
                ]
            return cache[key]

        await self._prefetch(affected, cache, ctx)
        flights = {f.flight_id for its in cache.values() for it in its for f in it.flights}
        taken = sorted(f"{fid}/{seat}" for fid in flights for seat in self.held.get(fid, ()))
        case = Case(disruption=d, affected=affected, alternatives=cache, taken_seats=taken, attempt=attempt)
        try:
            decisions = await self.reasoner.decide_in(ctx, case, lookup)
        except Exception as exc:  # a backend failure must not leave passengers without a decision
            ctx.log.warning(
                "reasoner %s failed on %s (%r); using the offline policy", self.reasoner.name, d.disruption_id, exc
            )
            decisions = []
        checked = await self.approvals.hold(self._check(case, decisions, cache, lookup), ctx)
        self.hold(checked)
        return checked

    async def _prefetch(
        self, affected: list[AffectedBooking], cache: dict[str, list[AlternativeItinerary]], ctx: Context
    ) -> None:
        """The itineraries of every booking's search, asked together (``AlternativesMany``): a flight
        that many searches find comes once, with its seats."""
        searches: dict[str, Alternatives] = {}
        for a in affected:
            if a.search not in cache and a.search not in searches:
                searches[a.search] = Alternatives(
                    origin=a.origin, destination=a.destination, not_before=a.not_before, exclude=a.exclude, limit=LIMIT
                )
        keys, asked = list(searches), list(searches.values())
        while asked:
            chunk = asked[:MAX_SEARCHES]
            reply = await ctx.request(AlternativesMany(searches=chunk), reply_as=_ManySeen)
            if not reply.results or len(reply.results) > len(chunk):
                raise QueryFailedError(f"AlternativesManyReply: {len(reply.results)} results for {len(chunk)} searches")
            for key, its in zip(keys, self._itineraries(reply), strict=False):
                cache[key] = its
            n = len(reply.results)  # a large answer holds the first searches' only: the others are asked again
            keys, asked = keys[n:], asked[n:]

    def _itineraries(self, reply: _ManySeen) -> list[list[AlternativeItinerary]]:
        """Each search's itineraries of ``reply``, its flights' seat lists decoded once (:class:`SeatLists`)."""
        if any(
            fid not in reply.flights or fid not in reply.free_seats
            for its in reply.results
            for it in its
            for fid in it.flights
        ):
            raise QueryFailedError("AlternativesManyReply: an itinerary names a flight the reply does not carry")
        seats = {fid: self.seats.of(raw) for fid, raw in reply.free_seats.items()}
        flights = reply.flights
        return [
            [
                AlternativeItinerary(
                    flights=[flights[f] for f in it.flights],
                    free_seats=[seats[f] for f in it.flights],
                    arrival=it.arrival,
                )
                for it in its
            ]
            for its in reply.results
        ]

    def _check(
        self, case: Case, decisions: list[RebookPassenger], cache: dict[str, list[AlternativeItinerary]], lookup: Lookup
    ) -> list[RebookPassenger]:
        """Keep the valid decisions; decide the rest with the offline policy."""
        taken = TakenSeats(case.taken_seats)
        by_booking = {a.booking.booking_id: a for a in case.affected}
        free: dict[str, set[str]] = defaultdict(set)
        seen: set[tuple[int, str]] = set()  # a list shared by itineraries (SeatLists) is read once per flight
        needed = {leg.flight_id for decision in decisions for leg in decision.new_legs}  # only these are read
        for its in cache.values():
            for it in its:
                for flight, free_seats in zip(it.flights, it.free_seats, strict=True):
                    fid = flight.flight_id
                    if fid in needed and (id(free_seats), fid) not in seen:
                        seen.add((id(free_seats), fid))
                        free[fid].update(s.number for s in free_seats)
        accepted: dict[str, RebookPassenger] = {}
        for decision in decisions:
            a = by_booking.get(decision.booking_id)
            if a is None or decision.booking_id in accepted:
                continue
            if sorted(decision.passenger_ids) != sorted(p.passenger_id for p in a.booking.passengers):
                continue
            seats = [f"{leg.flight_id}/{s}" for leg in decision.new_legs for s in leg.seats]
            if decision.action == "rebook" and (
                not decision.new_legs
                or any(len(leg.seats) != len(a.booking.passengers) for leg in decision.new_legs)
                or any(s in taken for s in seats)
                or any(s.partition("/")[2] not in free[s.partition("/")[0]] for s in seats)
                or len(set(seats)) != len(seats)
            ):
                continue
            taken.update(seats)
            accepted[decision.booking_id] = decision
        out = list(accepted.values())
        for booking_id, a in by_booking.items():
            if booking_id not in accepted:
                self.replaced += 1
                out.append(self.fallback.decide_one(case, a, taken))
        return out


class _ItinerarySeen(msgspec.Struct):
    """An ``AlternativeItinerary`` as the reasoner reads it: each flight's free seats left as JSON."""

    flights: list[Flight]
    free_seats: list[msgspec.Raw]
    arrival: int


class _AlternativesSeen(msgspec.Struct):
    """An ``AlternativesReply`` read with :class:`_ItinerarySeen`."""

    itineraries: list[_ItinerarySeen]


class _ManySeen(msgspec.Struct):
    """An ``AlternativesManyReply`` with each flight's free seats left as JSON."""

    results: list[list[ItineraryRef]]
    flights: dict[str, Flight] = {}
    free_seats: dict[str, msgspec.Raw] = {}


class SeatLists:
    """Free-seat lists of the context's ``Alternatives`` replies, decoded once per distinct list.

    The replies of one disruption, and of the next ones, name the same flights again and again with
    the same seats free: the context writes a flight's free seats the same way until a booking
    change moves one. Each distinct list is decoded once and shared by every itinerary that has it
    (what reads it must not change it); the policy, in turn, prepares each list once.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._lists: dict[bytes, list[Seat]] = {}
        self.decoded = 0  # distinct lists decoded
        self.shared = 0  # lists found decoded already

    def of(self, raw: msgspec.Raw) -> list[Seat]:
        key = bytes(raw)
        seats = self._lists.get(key)
        if seats is not None:
            self.shared += 1
            return seats
        try:
            seats = _decode_seats(key)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise QueryFailedError(f"AlternativesReply: invalid free seats: {exc}") from None
        if len(self._lists) >= self.size:
            self._lists.clear()
        self._lists[key] = seats
        self.decoded += 1
        return seats


_decode_seats = msgspec.json.Decoder(list[Seat]).decode

#: Decisions per ``RebookGroup`` at most, and its encoded size (well under NATS' 1 MiB max_payload).
GROUP_SIZE = 64
GROUP_BYTES = 256 * 1024


async def _publish_all(ctx: Context, decisions: list[RebookPassenger]) -> None:
    r"""Publish the decisions of one case in ``RebookGroup``\ s, all at once: their seats reach the
    rebooker, and the other replicas, while they are still free.

    A group's message id comes from its decisions' ids, not from its place in the handler's
    output: a redelivered disruption may be decided in another order (the world moved on), and
    a group already stored must not be dropped in place of another. A decision sent twice in
    different groups is applied once (the rebooker is idempotent on the decision id).
    """
    await asyncio.gather(*(ctx.publish(g, msg_id=f"decisions.{g.group_id}") for g in _groups(decisions)))


def _groups(decisions: list[RebookPassenger]) -> list[RebookGroup]:
    groups: list[RebookGroup] = []
    chunk: list[RebookPassenger] = []
    size = 0
    for decision in decisions:
        n = len(_encode(decision))
        if chunk and (len(chunk) == GROUP_SIZE or size + n > GROUP_BYTES):
            groups.append(_group(chunk))
            chunk, size = [], 0
        chunk.append(decision)
        size += n
    if chunk:
        groups.append(_group(chunk))
    return groups


def _group(decisions: list[RebookPassenger]) -> RebookGroup:
    ids = "\n".join(d.decision_id for d in decisions).encode()
    first = decisions[0].decision_id
    group_id = first if len(decisions) == 1 else f"{first}+{len(decisions) - 1}:{hashlib.sha1(ids).hexdigest()[:12]}"
    return RebookGroup(group_id=group_id, decisions=decisions)


_encode = msgspec.json.Encoder().encode


def affected_booking(d: Disruption, booking: Booking, mct_minutes: dict[str, int]) -> AffectedBooking | None:
    """How ``d`` affects ``booking`` (None: it does not)."""
    if booking.status != "active":
        return None
    legs = booking.legs
    idx = next((i for i, leg in enumerate(legs) if leg.flight_id == d.flight_id), None)
    if idx is None:
        return None
    destination = legs[-1].destination

    def from_disrupted_leg() -> tuple[int, bool]:
        if idx == 0:
            return max(d.observed_at + 45 * _MIN, legs[0].departure - 3 * 3600), False
        prev = legs[idx - 1]
        return max(d.observed_at + 30 * _MIN, prev.arrival + mct_minutes.get(prev.destination, 60) * _MIN), True

    if d.kind == "cancelled":
        not_before, stranded = from_disrupted_leg()
        return AffectedBooking(
            booking=booking,
            why="cancelled",
            replaces=[leg.flight_id for leg in legs[idx:]],
            origin=legs[idx].origin,
            destination=destination,
            not_before=not_before,
            current_arrival=None,
            stranded=stranded,
        ).with_search(d)
    if idx + 1 < len(legs) and legs[idx + 1].flight_id in d.missed_connections:
        hub = legs[idx + 1].origin
        arrival = d.estimated_arrival or legs[idx].arrival
        return AffectedBooking(
            booking=booking,
            why="missed_connection",
            replaces=[leg.flight_id for leg in legs[idx + 1 :]],
            origin=hub,
            destination=destination,
            not_before=arrival + mct_minutes.get(hub, 60) * _MIN,
            current_arrival=None,
            stranded=True,
        ).with_search(d)
    if d.long_delay:
        not_before, stranded = from_disrupted_leg()
        arrival = (d.estimated_arrival or legs[idx].arrival) if idx == len(legs) - 1 else legs[-1].arrival
        return AffectedBooking(
            booking=booking,
            why="long_delay",
            replaces=[leg.flight_id for leg in legs[idx:]],
            origin=legs[idx].origin,
            destination=destination,
            not_before=not_before,
            current_arrival=arrival,
            stranded=stranded,
        ).with_search(d)
    return None
