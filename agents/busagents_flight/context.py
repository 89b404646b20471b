"""The context agent: keeps the live view of the day and answers the reasoner's and the concierge's queries.

Replicable: every replica builds the same view. It starts from the day's snapshot and
replays the status feed's and the booking changes' streams from their start (view
subscriptions, :mod:`busagents.view`), then follows them live; a replica joins the
queue group of the queries only once it has caught up, so a fresh replica never
answers from a half-built view (queries go to the replicas that are ready).
"""

from __future__ import annotations

from typing import Any, cast

import msgspec
from busagents_travel import (
    AlternativeItinerary,
    Alternatives,
    AlternativesMany,
    AlternativesManyReply,
    AlternativesReply,
    BookingsChanged,
    BookingsOnFlight,
    BookingsOnFlightReply,
    Fare,
    FareRules,
    FareRulesReply,
    Flight,
    FlightInfo,
    FlightInfoReply,
    FlightStatusUpdated,
    ItineraryRef,
    OnwardConnections,
    OnwardConnectionsReply,
    PassengerBookings,
    PassengerBookingsReply,
    PassengerPreferences,
    PassengerPreferencesReply,
)

from busagents import Agent, Context, on

from .data import AirlineDay, generate
from .settings import FlightSettings
from .view import LiveView

__all__ = ["ContextAgent", "fare_rules"]

#: An ``AlternativesManyReply`` answers no further search once it holds this many bytes (about).
REPLY_BUDGET = 512 * 1024


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
        view = self.view
        # The free-seat lists leave as the JSON the view keeps of each flight's (msgspec.Raw): the bytes
        # encoding the seats would give, without encoding a flight's seats again for every reply.
        return AlternativesReply(
            itineraries=[
                AlternativeItinerary(
                    flights=[view.estimated_flight(fid) for fid in ids],
                    free_seats=cast(Any, [view.free_seats_json(fid) for fid in ids]),
                    arrival=arrival,
                )
                for arrival, ids in _itineraries(view, q)
            ]
        )

    @on(AlternativesMany)
    async def alternatives_many(self, q: AlternativesMany, ctx: Context) -> AlternativesManyReply:
        view = self.view
        results: list[list[ItineraryRef]] = []
        flights: dict[str, Flight] = {}
        seats: dict[str, msgspec.Raw] = {}  # each flight's free seats once, as the JSON the view keeps
        size = 0
        for search in q.searches:
            if size > REPLY_BUDGET:  # the others are asked again (one search alone stays well under 1 MiB)
                break
            found = _itineraries(view, search)
            for _, ids in found:
                for fid in ids:
                    if fid not in flights:
                        flights[fid] = view.estimated_flight(fid)
                        seats[fid] = view.free_seats_json(fid)
                        size += len(seats[fid]) + 200  # the flight, its seats
                size += 60
            results.append([ItineraryRef(flights=ids, arrival=arrival) for arrival, ids in found])
        return AlternativesManyReply(results=results, flights=flights, free_seats=cast(Any, seats))

    # The concierge's queries: a traveller's bookings, a flight's status, fare rules, preferences.
    # Each catches up first: an answer a traveller reads must not be older than the event stream.

    @on(PassengerBookings)
    async def passenger_bookings(self, q: PassengerBookings, ctx: Context) -> PassengerBookingsReply:
        await ctx.catch_up()
        bookings = self.view.bookings_of(q.passenger_id)
        passenger = next((p for b in bookings for p in b.passengers if p.passenger_id == q.passenger_id), None)
        return PassengerBookingsReply(
            passenger_id=q.passenger_id,
            passenger=passenger,
            bookings=bookings,
            cities=self.view.cities,
            changes=self.view.changes_of(q.passenger_id),
        )

    @on(FlightInfo)
    async def flight_info(self, q: FlightInfo, ctx: Context) -> FlightInfoReply:
        await ctx.catch_up()
        view = self.view
        flight = view.flights.get(q.flight_id)
        if flight is None:
            return FlightInfoReply(flight_id=q.flight_id, flight=None, status="unknown")
        update = view.status.get(q.flight_id)
        departure, arrival = view.times(q.flight_id)
        return FlightInfoReply(
            flight_id=q.flight_id,
            flight=flight,
            status=update.status if update is not None else "scheduled",
            estimated_departure=departure,
            estimated_arrival=arrival,
            delay_minutes=max(0, departure - flight.departure) // 60,
            gate=update.gate if update is not None else None,
            reason=update.reason if update is not None else "",
        )

    @on(FareRules)
    async def fare_rules(self, q: FareRules, ctx: Context) -> FareRulesReply:
        await ctx.catch_up()
        booking = self.view.bookings.get(q.booking_id)
        if booking is None:
            return FareRulesReply(booking_id=q.booking_id, fare=None)
        return FareRulesReply(booking_id=q.booking_id, fare=booking.fare, rules=fare_rules(booking.fare))

    @on(PassengerPreferences)
    async def preferences(self, q: PassengerPreferences, ctx: Context) -> PassengerPreferencesReply:
        await ctx.catch_up()
        bookings = self.view.bookings_of(q.passenger_id)
        p = next((p for b in bookings for p in b.passengers if p.passenger_id == q.passenger_id), None)
        if p is None:
            return PassengerPreferencesReply(passenger_id=q.passenger_id)
        return PassengerPreferencesReply(
            passenger_id=p.passenger_id, name=p.name, tier=p.tier, seat_preference=p.seat_preference, known=True
        )


def _itineraries(view: LiveView, q: Alternatives) -> list[tuple[int, list[str]]]:
    """The itineraries ``q`` asks for, as (estimated arrival, flight ids)."""
    return view.itineraries(
        q.origin,
        q.destination,
        q.not_before,
        exclude=set(q.exclude),
        cabin=q.cabin,
        min_free=q.min_free,
        limit=q.limit,
    )


def fare_rules(fare: Fare) -> list[str]:
    """A fare's change and refund rules, in words (what the concierge tells a traveller and checks)."""
    money = f"{fare.currency} {fare.change_fee / 100:,.2f}"
    return [
        f"fare class {fare.fare_class}, cabin {fare.cabin}",
        f"a change the passenger asks for costs {money} per passenger; free when the airline disrupted the flight",
        "changes keep the booked cabin and need a free seat for every passenger of the booking",
        (
            "refundable: a refund returns the fare in full, once"
            if fare.refundable
            else "non-refundable: a refund is given only when the airline cancelled the flight or delayed it "
            "beyond the rebooking threshold"
        ),
    ]
