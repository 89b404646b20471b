"""The context agent: keeps the live view of the day and answers the reasoner's queries.

Replicable: every replica builds the same view. It starts from the day's snapshot and
replays the status feed's and the booking changes' streams from their start (view
subscriptions, :mod:`busagents.view`), then follows them live; a replica joins the
queue group of the queries only once it has caught up, so a fresh replica never
answers from a half-built view (queries go to the replicas that are ready).
"""

from __future__ import annotations

from busagents_travel import (
    Alternatives,
    AlternativesReply,
    BookingsChanged,
    BookingsOnFlight,
    BookingsOnFlightReply,
    FlightStatusUpdated,
    OnwardConnections,
    OnwardConnectionsReply,
)

from busagents import Agent, Context, on

from .data import AirlineDay, generate
from .settings import FlightSettings
from .view import LiveView

__all__ = ["ContextAgent"]


class ContextAgent(Agent):
    """Materialised view of flights, seats, bookings and policies, fed from events."""

    name = "flight-context"
    max_concurrency = 1  # answers are pure reads without an await: more lanes would not add any

    def __init__(self, day: AirlineDay | None = None) -> None:
        if day is None:
            s = FlightSettings()
            day = generate(s.flights, s.passengers, s.seed)
        self.view = LiveView(day)

    @on(FlightStatusUpdated, view=True)
    async def status(self, update: FlightStatusUpdated, ctx: Context) -> None:
        self.view.apply_status(update)

    @on(BookingsChanged, view=True)
    async def changed(self, changed: BookingsChanged, ctx: Context) -> None:
        for change in changed.changes:
            self.view.apply_change(change)

    @on(BookingsOnFlight)
    async def bookings_on_flight(self, q: BookingsOnFlight, ctx: Context) -> BookingsOnFlightReply:
        # who is on a flight decides who is affected: not older than the event stream (a booking
        # moved onto a flight just before its cancellation was announced is on it)
        await ctx.catch_up()
        view = self.view
        bookings = view.bookings_on(q.flight_id)
        airports = {leg.origin for b in bookings for leg in b.legs} | {
            leg.destination for b in bookings for leg in b.legs
        }
        return BookingsOnFlightReply(
            flight_id=q.flight_id,
            flight=view.flights.get(q.flight_id),
            bookings=bookings,
            mct_minutes={a: view.mct.get(a, 60) for a in sorted(airports)},
        )

    @on(OnwardConnections)
    async def onward(self, q: OnwardConnections, ctx: Context) -> OnwardConnectionsReply:
        mct, connections = self.view.onward(q.flight_id)
        return OnwardConnectionsReply(flight_id=q.flight_id, mct_minutes=mct, connections=connections)

    @on(Alternatives)
    async def alternatives(self, q: Alternatives, ctx: Context) -> AlternativesReply:
        found = self.view.alternatives(
            q.origin,
            q.destination,
            q.not_before,
            exclude=set(q.exclude),
            cabin=q.cabin,
            min_free=q.min_free,
            limit=q.limit,
        )
        return AlternativesReply(itineraries=found)
