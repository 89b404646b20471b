"""The context agent's live view: what it answers follows every change, also where it caches."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import msgspec
import pytest
from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.feed import status_feed
from busagents_flight.view import LiveView
from busagents_travel import (
    MAX_SEARCHES,
    AlternativeItinerary,
    Alternatives,
    AlternativesMany,
    AlternativesReply,
    BookingChanged,
    BookingsChanged,
    Flight,
    Leg,
    PassengerBookings,
)
from nats.aio.msg import Msg

from busagents import Bus, QueryFailedError
from busagents.contract import contract_info
from busagents.testing import run_agents


def _held(view: LiveView) -> dict[str, set[str]]:
    """Flight id -> the seats active bookings hold, read off the bookings themselves."""
    held: dict[str, set[str]] = defaultdict(set)
    for booking in view.bookings.values():
        if booking.status == "active":
            for leg in booking.legs:
                held[leg.flight_id].update(leg.seats)
    return held


def test_free_seats_and_alternatives_follow_booking_changes_and_status_updates() -> None:
    day = generate(60, 4_000, 11)
    view = LiveView(day)
    rng = random.Random(4)
    flights = day.flights
    for update in status_feed(day)[:200]:
        view.apply_status(update)
    moved = checked = 0
    for step in range(150):
        flight = rng.choice(flights)
        held = _held(view)
        for it in view.alternatives(flight.origin, flight.destination, flight.departure - 7200, limit=4):
            for f, free in zip(it.flights, it.free_seats, strict=True):
                assert (f.departure, f.arrival) == view.times(f.flight_id)
                checked += 1
                seats = view.seat_maps[view.flights[f.flight_id].aircraft]
                assert [s.number for s in free] == [s.number for s in seats if s.number not in held[f.flight_id]]
                assert bytes(view.free_seats_json(f.flight_id)) == msgspec.json.encode(free)  # its JSON, current
        # move a booking's first leg onto free seats of another flight, or refund it
        booking = rng.choice([b for b in view.bookings.values() if b.status == "active"])
        target = rng.choice(flights)
        free = [s for s in view.free_seats(target.flight_id) if s.cabin == booking.legs[0].cabin]
        if step % 4 == 0 or len(free) < len(booking.passengers):
            action, new_legs = "refund", []
        else:
            numbers = [s.number for s in free[: len(booking.passengers)]]
            f = target
            new_legs = [
                Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, free[0].cabin, numbers)
            ]
            action = "rebook"
        view.apply_change(
            BookingChanged(
                decision_id=f"d{step}",
                disruption_id="x",
                booking_id=booking.booking_id,
                flight_id=booking.legs[0].flight_id,
                action=action,  # type: ignore[arg-type]
                passengers=booking.passengers,
                old_legs=booking.legs[:1],
                new_legs=new_legs,
                version=booking.version + 1,
            )
        )
        moved += 1
        held = _held(view)
        for fid in {booking.legs[0].flight_id, target.flight_id}:
            seats = view.seat_maps[view.flights[fid].aircraft]
            assert {s.number for s in view.free_seats(fid)} == {s.number for s in seats} - held[fid]
    assert moved == 150 and checked > 100


def test_keeps_refunds_reseats_and_changes_to_refunded_bookings_leave_the_view_as_rebuilt_from_its_bookings() -> None:
    day = generate(40, 2_000, 5)
    view = LiveView(day)
    rng = random.Random(9)
    actions = {"keep": 0, "refund": 0, "reseat": 0, "rebook": 0, "late": 0}
    for step in range(400):
        booking = rng.choice(list(view.bookings.values()))
        leg = booking.legs[0]
        kind = rng.choice(["keep", "refund", "reseat", "rebook"]) if booking.status == "active" else "late"
        old_legs, new_legs, action = booking.legs, booking.legs, "keep"
        if kind == "refund":
            old_legs, new_legs, action = booking.legs, [], "refund"
        elif kind in ("reseat", "rebook"):  # other seats on the same flight, or seats on another flight
            target = view.flights[leg.flight_id] if kind == "reseat" else rng.choice(day.flights)
            free = [x.number for x in view.free_seats(target.flight_id) if x.cabin == leg.cabin]
            if len(free) < len(booking.passengers):
                continue
            numbers = rng.sample(free, len(booking.passengers))
            f = target
            new_legs = [Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, leg.cabin, numbers)]
            old_legs, action = [leg], "rebook"
        cached = view.free_seats(leg.flight_id)
        view.apply_change(
            BookingChanged(
                decision_id=f"d{step}",
                disruption_id="x",
                booking_id=booking.booking_id,
                flight_id=leg.flight_id,
                action=action,  # type: ignore[arg-type]
                passengers=booking.passengers,
                old_legs=old_legs,
                new_legs=new_legs,
                version=booking.version + 1,
            )
        )
        actions[kind] += 1
        if kind in ("keep", "late"):  # nothing moved: the flight's free seats are still the list built before
            assert view.free_seats(leg.flight_id) is cached
    rebuilt = LiveView(msgspec.structs.replace(day, bookings=list(view.bookings.values())))
    assert {f: s for f, s in view.taken.items() if s} == {f: s for f, s in rebuilt.taken.items() if s}
    assert {f: b for f, b in view.by_flight.items() if b} == {f: b for f, b in rebuilt.by_flight.items() if b}
    for flight in day.flights:
        assert view.free_seats(flight.flight_id) == rebuilt.free_seats(flight.flight_id)
    assert all(n > 10 for n in actions.values()), actions


def test_the_days_value_records_are_not_tracked_by_the_garbage_collector() -> None:
    """Decoding a reply makes thousands of seats, flights and bookings: none is left for the cyclic
    collector to scan (they hold no reference back)."""
    import gc

    import msgspec
    from busagents_travel import AlternativesReply, BookingsOnFlightReply

    day = generate(30, 2_000, 3)
    view = LiveView(day)
    flight = day.flights[0]
    its = view.alternatives(flight.origin, flight.destination, flight.departure - 7200, limit=4)
    reply = msgspec.json.decode(msgspec.json.encode(AlternativesReply(itineraries=its)), type=AlternativesReply)
    bookings = BookingsOnFlightReply(
        flight_id=flight.flight_id, flight=flight, bookings=view.bookings_on(flight.flight_id)
    )
    back = msgspec.json.decode(msgspec.json.encode(bookings), type=BookingsOnFlightReply)
    records = [
        *(s for it in reply.itineraries for seats in it.free_seats for s in seats),
        *(f for it in reply.itineraries for f in it.flights),
        *back.bookings,
        *(p for b in back.bookings for p in b.passengers),
        *(leg for b in back.bookings for leg in b.legs),
        *(b.fare for b in back.bookings),
    ]
    assert len(records) > 200
    assert not any(gc.is_tracked(r) for r in records)


async def test_an_alternatives_reply_carries_the_seats_free_now_as_the_contract_encodes_them(bus: Bus) -> None:
    """The context agent sends each flight's free seats as JSON it keeps until seats move: the reply is
    the bytes of the view's answer encoded, before and after a booking change takes a seat."""
    day = generate(40, 3_000, 5)
    agent = ContextAgent(day)
    view = agent.view
    flight = next(
        f for f in day.flights if len(view.alternatives(f.origin, f.destination, f.departure - 7200, limit=8)) >= 2
    )
    q = Alternatives(origin=flight.origin, destination=flight.destination, not_before=flight.departure - 7200, limit=8)
    subject = contract_info(Alternatives).subject

    async def asked() -> tuple[bytes, list[str]]:
        msg = await bus.nc.request(subject, msgspec.json.encode(q), timeout=5)
        expected = AlternativesReply(
            itineraries=view.alternatives(q.origin, q.destination, q.not_before, limit=q.limit)
        )
        assert msg.data == msgspec.json.encode(expected)
        reply = msgspec.json.decode(msg.data, type=AlternativesReply)
        return msg.data, [s.number for s in reply.itineraries[0].free_seats[0]]

    async with run_agents(bus, agent):
        before, free = await asked()
        first = view.alternatives(q.origin, q.destination, q.not_before, limit=1)[0].flights[0]
        booking = next(b for b in day.bookings if b.status == "active" and len(b.passengers) == 1)
        seat = view.free_seats(first.flight_id)[0]
        f = view.flights[first.flight_id]
        leg = Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, seat.cabin, [seat.number])
        change = BookingChanged(
            decision_id="d1",
            disruption_id="x",
            booking_id=booking.booking_id,
            flight_id=booking.legs[0].flight_id,
            action="rebook",
            passengers=booking.passengers,
            old_legs=booking.legs[:1],
            new_legs=[leg],
            version=booking.version + 1,
        )
        await bus.publish(BookingsChanged(group_id="d1", changes=[change]))
        # a passenger's bookings are answered once the view caught up with the stream: the change is in
        mine = await bus.request(PassengerBookings(passenger_id=booking.passengers[0].passenger_id))
        assert [b.legs[0].flight_id for b in mine.bookings if b.booking_id == booking.booking_id] == [f.flight_id]
        after, free_after = await asked()
    assert seat.number in free and seat.number not in free_after and before != after


def _searches(view: LiveView, flights: list[Flight]) -> list[Alternatives]:
    """Searches from the same few places at different times: their itineraries share flights."""
    out = []
    for f in flights:
        for hours in (2, 3):
            out.append(Alternatives(origin=f.origin, destination=f.destination, not_before=f.departure - hours * 3600))
        out.append(
            Alternatives(
                origin=f.origin,
                destination=f.destination,
                not_before=f.departure - 7200,
                exclude=[f.flight_id],
                limit=4,
            )
        )
    return out


async def test_many_searches_in_one_query_are_answered_as_each_alone_with_each_flight_sent_once(bus: Bus) -> None:
    """``AlternativesMany`` answers every search as ``Alternatives`` would (same itineraries, same
    seats), carrying each flight and its free seats once; a reply that would grow too large answers
    the first searches only; a query with no search, or too many, is refused with the reason."""
    from busagents_flight import context

    day = generate(60, 4_000, 11)
    agent = ContextAgent(day)
    view = agent.view
    searches = _searches(view, [day.flights[i] for i in (3, 17, 29, 41)])
    async with run_agents(bus, agent):
        reply = await bus.request(AlternativesMany(searches=searches))
        assert len(reply.results) == len(searches)
        slots = 0
        for s, refs in zip(searches, reply.results, strict=True):
            alone = view.alternatives(s.origin, s.destination, s.not_before, exclude=set(s.exclude), limit=s.limit)
            assert [(r.arrival, r.flights) for r in refs] == [
                (it.arrival, [f.flight_id for f in it.flights]) for it in alone
            ]
            for it in alone:
                for f, free in zip(it.flights, it.free_seats, strict=True):
                    assert reply.flights[f.flight_id] == f and reply.free_seats[f.flight_id] == free
                    slots += 1
        assert slots > 30 and len(reply.flights) == len(reply.free_seats) < slots / 2  # shared flights, sent once

        old = context.REPLY_BUDGET
        context.REPLY_BUDGET = 1  # any flight makes it full: one search a reply
        try:
            part = await bus.request(AlternativesMany(searches=searches))
        finally:
            context.REPLY_BUDGET = old
        assert part.results == reply.results[:1] and set(part.flights) == set(reply.results[0][0].flights) | {
            f for r in reply.results[0] for f in r.flights
        }

        with pytest.raises(QueryFailedError, match="length >= 1"):
            await bus.request(AlternativesMany(searches=[]))
        with pytest.raises(QueryFailedError, match=f"length <= {MAX_SEARCHES}"):
            await bus.request(AlternativesMany(searches=searches[:1] * (MAX_SEARCHES + 1)))


async def test_the_reasoner_asks_a_disruptions_searches_together_and_again_for_those_left_out(bus: Bus) -> None:
    """The reasoner gathers the itineraries of a cancelled flight's passengers in one ``AlternativesMany``;
    when the context answers only the first searches (a reply at its size budget), it asks for the
    rest, and ends with the same itineraries as from one reply."""
    import logging

    from busagents_flight import context
    from busagents_flight.reasoner import ReasonerAgent, affected_booking
    from busagents_flight.reasoning import AffectedBooking
    from busagents_travel import Disruption, FlightCancelled

    from busagents import Context

    day = generate(60, 4_000, 11)
    agent = ContextAgent(day)
    view = agent.view

    def cancel(flight: Flight) -> list[AffectedBooking]:
        d = Disruption.of(
            FlightCancelled(
                disruption_id="c1", flight_id=flight.flight_id, number=flight.number, origin=flight.origin,
                destination=flight.destination, observed_at=flight.departure - 3 * 3600, reason="crew",
            )
        )  # fmt: skip
        return [a for b in view.bookings_on(flight.flight_id) if (a := affected_booking(d, b, view.mct))]

    def found(affected: list[AffectedBooking]) -> int:  # searches that find an itinerary
        seen = {a.search: a for a in affected}.values()
        return sum(1 for a in seen if view.itineraries(a.origin, a.destination, a.not_before, exclude=set(a.exclude)))

    affected = cancel(max(day.flights, key=lambda f: found(cancel(f))))
    searches = {a.search for a in affected}
    assert found(affected) >= 3
    asked: asyncio.Queue[int] = asyncio.Queue()

    async def count(msg: Msg) -> None:
        asked.put_nowait(len(msgspec.json.decode(msg.data, type=AlternativesMany).searches))

    reasoner = ReasonerAgent("offline")
    ctx = Context(reasoner, bus, logging.getLogger("test"))
    sub = await bus.nc.subscribe(contract_info(AlternativesMany).subject, cb=count)
    async with run_agents(bus, agent):
        whole: dict[str, list[AlternativeItinerary]] = {}
        await reasoner._prefetch(affected, whole, ctx)
        old = context.REPLY_BUDGET
        context.REPLY_BUDGET = 1  # one search a reply
        try:
            parts: dict[str, list[AlternativeItinerary]] = {}
            await reasoner._prefetch(affected, parts, ctx)
        finally:
            context.REPLY_BUDGET = old
    assert set(whole) == searches and msgspec.json.encode(parts) == msgspec.json.encode(whole)
    # all at once; then, at the budget, each reply answers up to the first search that found a flight,
    # and the reasoner asks for the rest again
    keys, expected, i = list(whole), [len(whole)], 0
    while i < len(keys):
        expected.append(len(keys) - i)
        while i < len(keys) - 1 and not whole[keys[i]]:
            i += 1
        i += 1
    async with asyncio.timeout(10):  # the copies of the queries this subscription got
        seen = [await asked.get() for _ in expected]
    await sub.unsubscribe()
    assert seen == expected and len(expected) > 3


def test_a_reply_naming_a_flight_it_does_not_carry_fails_the_query_with_the_reason() -> None:
    """An ``AlternativesManyReply`` (another context, another language) whose itinerary names a flight
    missing from its ``flights`` or ``free_seats`` is a failed query, said so, not a KeyError."""
    from busagents_flight.reasoner import ReasonerAgent, _ManySeen
    from busagents_travel import ItineraryRef

    day = generate(20, 500, 3)
    flight = day.flights[0]
    reasoner = ReasonerAgent("offline")
    seats = msgspec.Raw(msgspec.json.encode(day.seat_maps[flight.aircraft][:2]))
    whole = _ManySeen(
        results=[[ItineraryRef(flights=[flight.flight_id], arrival=flight.arrival)]],
        flights={flight.flight_id: flight},
        free_seats={flight.flight_id: seats},
    )
    [[it]] = reasoner._itineraries(whole)
    assert it.flights == [flight] and [s.number for s in it.free_seats[0]] == [
        s.number for s in day.seat_maps[flight.aircraft][:2]
    ]
    for broken in (msgspec.structs.replace(whole, flights={}), msgspec.structs.replace(whole, free_seats={})):
        with pytest.raises(QueryFailedError, match="names a flight the reply does not carry"):
            reasoner._itineraries(broken)
