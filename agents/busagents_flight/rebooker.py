"""The rebooker: applies each decision to the booking store, then reports what happened.

Decisions come one by one (``RebookPassenger``) or in groups (``RebookGroup``); either way
the changes go out as one ``BookingsChanged`` (so every change of the store is in one stream,
in order) and each rejection as its own ``RebookRejected``.

The side effect is the store's :meth:`~busagents_flight.store.BookingStore.apply`
(atomic, idempotent on the decision id). Seats that do not exist on the aircraft
or lie in another cabin are rejected before the store is touched. The rebooker
gives the store the day's seat maps, so a proposed seat sold meanwhile is replaced
by a free one of the same cabin inside the store's transaction.
"""

from __future__ import annotations

import msgspec
from busagents_travel import BookingChanged, BookingsChanged, Leg, RebookGroup, RebookPassenger, RebookRejected

from busagents import Agent, Context, on

from .data import AirlineDay, generate, schedule
from .settings import FlightSettings
from .store import BookingStore, Outcome, SeatMaps, open_store, rejection

__all__ = ["Rebooker"]

_CABINS = ("Y", "W", "J", "F")  # lowest to highest


class Rebooker(Agent):
    """``RebookPassenger`` / ``RebookGroup`` -> store -> ``BookingsChanged`` and ``RebookRejected``."""

    name = "flight-rebooker"
    produces = (BookingsChanged, RebookRejected)
    max_concurrency = 32  # decisions handled together share a store transaction

    def __init__(
        self, store: BookingStore | None = None, day: AirlineDay | None = None, *, load: bool | None = None
    ) -> None:
        """``load``: replace the store's content with the day's bookings (None: only when the store is empty).

        The store is given the day's seat maps (replacing any it had), the ones decisions are checked against.
        """
        self.settings = settings = FlightSettings()
        self.day = day
        flights, seat_maps = (day.flights, day.seat_maps) if day else schedule(settings.flights, settings.seed)
        self.seat_maps = SeatMaps(flights, seat_maps)
        self.store = store if store is not None else open_store(settings.store)
        self.store.seat_maps = self.seat_maps
        self._load = load
        self.applied = 0
        self.rejected = 0
        self.fell_back = 0  # decisions applied with one of their fallback itineraries

    async def on_start(self, ctx: Context) -> None:
        await self.store.open()
        if self._load or (self._load is None and await self.store.is_empty()):
            if self.day is None:  # generated only when the store needs the day's bookings
                s = self.settings
                self.day = generate(s.flights, s.passengers, s.seed)
            await self.store.load(self.day.bookings)

    async def on_stop(self, ctx: Context) -> None:
        await self.store.close()

    @on(RebookPassenger)
    async def rebook(self, decision: RebookPassenger, ctx: Context) -> list[BookingsChanged | RebookRejected]:
        return _report(decision.decision_id, [await self.apply(decision)])

    @on(RebookGroup)
    async def rebook_group(self, group: RebookGroup, ctx: Context) -> list[BookingsChanged | RebookRejected]:
        # applied together: the store commits the decisions that arrive together in one transaction
        return _report(group.group_id, await self.apply_many(group.decisions))

    async def apply(self, decision: RebookPassenger) -> Outcome:
        """Apply one decision (checked, then settled against the inventory); its outcome."""
        return (await self.apply_many([decision]))[0]

    async def apply_many(self, decisions: list[RebookPassenger]) -> list[Outcome]:
        """Apply decisions together (checked, then settled against the inventory in one store call);
        their outcomes, in order. A decision that fails (the store's error) fails them all, for the
        group to come again: those applied are recorded, and give the same outcome then."""
        outcomes: list[Outcome | None] = [None] * len(decisions)
        valid: list[int] = []
        for i, decision in enumerate(decisions):
            problem = self._invalid_seat(decision)
            if problem:
                outcomes[i] = rejection(decision, "invalid", problem)
            else:
                valid.append(i)
        applied = await self.store.apply_many([decisions[i] for i in valid]) if valid else []
        for i, result in zip(valid, applied, strict=True):
            if isinstance(result, Exception):
                raise result
            if isinstance(result, RebookRejected) and result.reason == "seat_taken":
                result = await self._fall_back(decisions[i], result)
            outcomes[i] = result
        done = [o for o in outcomes if o is not None]
        assert len(done) == len(decisions)
        changed = sum(1 for o in done if isinstance(o, BookingChanged))
        self.applied += changed
        self.rejected += len(done) - changed
        return done

    async def _fall_back(self, decision: RebookPassenger, rejected: RebookRejected) -> Outcome:
        """When the decision's cabin is full by now: its itinerary in a higher cabin, then each of its
        fallback itineraries (in their cabin, then higher): the first with room for the group, or ``rejected``.

        What the policy allows anyway (an upgrade on the same terms, the reasoner's own next choices),
        settled here against the inventory rather than against a reasoner's view of it, which another
        replica's decisions may have overtaken. Each try is a decision of its own (``<id>+<n>``,
        recorded: a redelivery gets the same outcome), its rationale saying why.
        """
        n = 0
        for k, legs in enumerate([decision.new_legs, *decision.fallbacks]):
            for cabin in self._cabins_to_try(decision, legs[0].cabin, first=k == 0):
                seated = [self._in_cabin(leg, cabin, len(decision.passenger_ids)) for leg in legs]
                if any(leg is None for leg in seated):
                    continue
                n += 1
                new_legs = [leg for leg in seated if leg is not None]
                route = " + ".join(f"{leg.number} {leg.origin} -> {leg.destination} ({leg.cabin})" for leg in new_legs)
                why = f"first choice full when booked ({', '.join(rejected.taken_seats)}); rebooked on {route} instead"
                alternative = msgspec.structs.replace(
                    decision,
                    decision_id=f"{decision.decision_id}+{n}",
                    new_legs=new_legs,
                    fallbacks=[],
                    rationale=f"{decision.rationale}; {why}" if decision.rationale else why,
                )
                outcome = await self.store.apply(alternative)
                if isinstance(outcome, BookingChanged):
                    self.fell_back += 1
                    return outcome
                if outcome.reason != "seat_taken":
                    return rejected  # the booking moved on meanwhile: the first answer stands, and is re-decided
        return rejected

    @staticmethod
    def _cabins_to_try(decision: RebookPassenger, cabin: str, *, first: bool) -> list[str]:
        """The leg's cabin (not for the decision's own itinerary: tried already), then higher ones,
        unless the decision is a downgrade (half the fare refunded: another cabin, other terms)."""
        higher = [c for c in _CABINS[_CABINS.index(cabin) + 1 :]] if decision.cost.refund == 0 else []
        return higher if first else [cabin, *higher]

    def _in_cabin(self, leg: Leg, cabin: str, n: int) -> Leg | None:
        """``leg`` in ``cabin`` with seats proposed for ``n`` passengers (the store seats the group among
        those still free); None when the aircraft has fewer seats in that cabin."""
        if cabin == leg.cabin:
            return leg
        seats = self.seat_maps.seats(leg.flight_id, cabin)
        if len(seats) < n:
            return None
        return msgspec.structs.replace(leg, cabin=cabin, seats=[s.number for s in seats[-n:]])

    def _invalid_seat(self, decision: RebookPassenger) -> str:
        for leg in decision.new_legs:
            aircraft = self.seat_maps.aircraft(leg.flight_id)
            if aircraft is None:
                return f"unknown flight {leg.flight_id}"
            for seat in leg.seats:
                if self.seat_maps.cabin(leg.flight_id, seat) != leg.cabin:
                    return f"seat {seat} is not a {leg.cabin} seat of {leg.flight_id} ({aircraft})"
        return ""


def _report(group_id: str, outcomes: list[Outcome]) -> list[BookingsChanged | RebookRejected]:
    """The changes together, in the order of the decisions, then each rejection."""
    changes = [o for o in outcomes if isinstance(o, BookingChanged)]
    rejections: list[BookingsChanged | RebookRejected] = [o for o in outcomes if isinstance(o, RebookRejected)]
    return [BookingsChanged(group_id=group_id, changes=changes), *rejections] if changes else rejections
