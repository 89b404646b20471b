"""The rebooker: applies each decision to the booking store, then reports what happened.

The side effect is the store's :meth:`~busagents_flight.store.BookingStore.apply`
(atomic, idempotent on the decision id). Seats that do not exist on the aircraft
or lie in another cabin are rejected before the store is touched. The rebooker
gives the store the day's seat maps, so a proposed seat sold meanwhile is replaced
by a free one of the same cabin inside the store's transaction.
"""

from __future__ import annotations

import msgspec
from busagents_travel import BookingChanged, RebookPassenger, RebookRejected

from busagents import Agent, Context, on

from .data import AirlineDay, generate, schedule
from .settings import FlightSettings
from .store import BookingStore, Outcome, SeatMaps, open_store

__all__ = ["Rebooker"]


class Rebooker(Agent):
    """``RebookPassenger`` -> store -> ``BookingChanged`` or ``RebookRejected``."""

    name = "flight-rebooker"
    produces = (BookingChanged, RebookRejected)
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
    async def rebook(self, decision: RebookPassenger, ctx: Context) -> Outcome:
        problem = self._invalid_seat(decision)
        if problem:
            self.rejected += 1
            return RebookRejected(
                decision_id=decision.decision_id,
                disruption=decision.disruption,
                booking_id=decision.booking_id,
                reason="invalid",
                passenger_ids=decision.passenger_ids,
                detail=problem,
                attempt=decision.attempt,
            )
        outcome = await self.store.apply(decision)
        if isinstance(outcome, RebookRejected) and outcome.reason == "seat_taken":
            outcome = await self._fall_back(decision, outcome)
        if isinstance(outcome, BookingChanged):
            self.applied += 1
        else:
            self.rejected += 1
        return outcome

    async def _fall_back(self, decision: RebookPassenger, rejected: RebookRejected) -> Outcome:
        """The first of the decision's fallback itineraries with room for the group, or ``rejected``.

        Each is applied as a decision of its own (``<decision id>+<n>``: recorded, so a redelivery
        gets the same outcome), its rationale saying why the first choice was not taken.
        """
        for n, legs in enumerate(decision.fallbacks, 1):
            route = " + ".join(f"{leg.number} {leg.origin} -> {leg.destination}" for leg in legs)
            why = f"first choice full when booked ({', '.join(rejected.taken_seats)}); rebooked on {route} instead"
            alternative = msgspec.structs.replace(
                decision,
                decision_id=f"{decision.decision_id}+{n}",
                new_legs=legs,
                fallbacks=[],
                rationale=f"{decision.rationale}; {why}" if decision.rationale else why,
            )
            if self._invalid_seat(alternative):
                continue
            outcome = await self.store.apply(alternative)
            if isinstance(outcome, BookingChanged):
                self.fell_back += 1
                return outcome
            if outcome.reason != "seat_taken":
                return rejected  # the booking moved on meanwhile: the first answer stands, and is re-decided
        return rejected

    def _invalid_seat(self, decision: RebookPassenger) -> str:
        for leg in decision.new_legs:
            aircraft = self.seat_maps.aircraft(leg.flight_id)
            if aircraft is None:
                return f"unknown flight {leg.flight_id}"
            for seat in leg.seats:
                if self.seat_maps.cabin(leg.flight_id, seat) != leg.cabin:
                    return f"seat {seat} is not a {leg.cabin} seat of {leg.flight_id} ({aircraft})"
        return ""
