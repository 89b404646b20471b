"""Two rebooker replicas racing for one seat: with other seats free in the cabin both passengers are
seated (the store picks the loser another seat); for the cabin's last seat the loser is re-decided."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import pytest
from busagents_flight.context import ContextAgent
from busagents_flight.data import AirlineDay, generate
from busagents_flight.policy import choose_seats
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.rebooker import Rebooker
from busagents_flight.store import SeatMaps, SqliteStore
from busagents_flight.view import LiveView
from busagents_travel import Booking, Disruption, Flight, Leg, RebookGroup, RebookPassenger, RebookRejected

from busagents import Bus, Worker
from busagents.testing import run_agents

from .flight_expect import expect_changes
from .test_flight_store import filler_booking

DAY = generate(flights=24, passengers=1500, seed=9)


class Race(NamedTuple):
    """Two single-passenger bookings on one cancelled flight, both decided onto ``seat`` of ``target``."""

    a: Booking
    b: Booking
    target: Flight
    cabin: str
    seat: str
    disruption: Disruption

    def decision(self, booking: Booking) -> RebookPassenger:
        t = self.target
        leg = Leg(t.flight_id, t.number, t.origin, t.destination, t.departure, t.arrival, self.cabin, [self.seat])  # type: ignore[arg-type]
        return RebookPassenger(
            decision_id=f"race-{booking.booking_id}", disruption=self.disruption, booking_id=booking.booking_id,
            action="rebook", passenger_ids=[booking.passengers[0].passenger_id],
            replaces=[self.disruption.flight_id], new_legs=[leg], expected_version=booking.version,
        )  # fmt: skip


def _full(day: AirlineDay, flight: Flight, cabin: str, leave: str) -> AirlineDay:
    """``day`` with ``cabin`` of ``flight`` sold out but ``leave``, and every higher cabin sold out."""
    higher = ("Y", "W", "J", "F")[("Y", "W", "J", "F").index(cabin) :]
    fillers = []
    for c in higher:
        filler = filler_booking(day, flight.flight_id, c, leave={leave})
        people = [msgspec.structs.replace(p, passenger_id=f"{p.passenger_id}-{c}") for p in filler.passengers]
        fillers.append(msgspec.structs.replace(filler, booking_id=f"FILL-{c}", passengers=people))
    return msgspec.structs.replace(day, bookings=[*day.bookings, *fillers])


def _race(day: AirlineDay) -> Race:
    cancelled = next(
        f for f in day.flights
        if sum(1 for b in day.bookings if len(b.passengers) == 1 and b.legs[0].flight_id == f.flight_id) >= 2
    )  # fmt: skip
    a, b = [x for x in day.bookings if len(x.passengers) == 1 and x.legs[0].flight_id == cancelled.flight_id][:2]
    cabin = a.legs[0].cabin
    view = LiveView(day)
    target = next(
        f for f in day.flights
        if f.origin == cancelled.origin and f.destination == a.legs[-1].destination
        and f.flight_id != cancelled.flight_id
        and len([s for s in view.free_seats(f.flight_id) if s.cabin == cabin]) >= 2
    )  # fmt: skip
    seat = next(s.number for s in view.free_seats(target.flight_id) if s.cabin == cabin)
    disruption = Disruption(
        disruption_id=f"{cancelled.flight_id}#1", kind="cancelled", flight_id=cancelled.flight_id,
        number=cancelled.number, origin=cancelled.origin, destination=cancelled.destination,
        observed_at=cancelled.departure - 4 * 3600,
    )  # fmt: skip
    return Race(a, b, target, cabin, seat, disruption)


async def test_two_rebookers_racing_for_the_last_seat_of_a_cabin_sell_it_once_and_the_loser_is_redecided(
    bus: Bus, tmp_path: Path
) -> None:
    race = _race(DAY)
    day = _full(DAY, race.target, race.cabin, race.seat)  # the seat is the flight's last in its cabin and above
    a, b = race.a, race.b
    path = tmp_path / "bookings.sqlite3"
    first = Rebooker(SqliteStore(path), day, load=True)
    second = Rebooker(SqliteStore(path), day)
    async with run_agents(bus, ContextAgent(day), ReasonerAgent("offline"), first):
        async with Worker([second], bus):
            changed = expect_changes(bus, where=lambda c: c.booking_id in (a.booking_id, b.booking_id), count=2)
            rejected = bus.expect(RebookRejected, where=lambda r: r.booking_id in (a.booking_id, b.booking_id))
            async with changed, rejected:
                await bus.publish(race.decision(a))
                await bus.publish(race.decision(b))
    loser = rejected.message.body
    assert loser.reason == "seat_taken"
    assert loser.taken_seats == [f"{race.target.flight_id}/{race.seat}"]
    by_booking = {c.booking_id: c for c in changed.items}
    winner = by_booking[a.booking_id if loser.booking_id == b.booking_id else b.booking_id]
    redecided = by_booking[loser.booking_id]
    assert winner.new_legs[0].seats == [race.seat]
    assert redecided.decision_id.endswith("/2")  # the reasoner's second attempt
    assert (redecided.new_legs[0].flight_id, redecided.new_legs[0].seats) != (race.target.flight_id, [race.seat])
    store = SqliteStore(path)
    assert await store.seat_conflicts() == 0
    await store.close()


async def test_two_rebookers_racing_for_a_seat_with_others_free_in_the_cabin_seat_both_passengers(
    bus: Bus, tmp_path: Path
) -> None:
    race = _race(DAY)
    a, b = race.a, race.b
    path = tmp_path / "bookings.sqlite3"
    first = Rebooker(SqliteStore(path), DAY, load=True)
    second = Rebooker(SqliteStore(path), DAY)
    async with run_agents(bus, first):
        async with Worker([second], bus):
            changed = expect_changes(bus, where=lambda c: c.booking_id in (a.booking_id, b.booking_id), count=2)
            async with changed:
                await bus.publish(race.decision(a))
                await bus.publish(race.decision(b))
    outcomes = list(changed.items)
    assert sorted(c.decision_id for c in outcomes) == sorted(f"race-{x.booking_id}" for x in (a, b))
    assert (first.rejected + second.rejected, first.applied + second.applied) == (0, 2)  # no RebookRejected
    legs = [c.new_legs[0] for c in outcomes]
    assert {leg.flight_id for leg in legs} == {race.target.flight_id}
    maps = SeatMaps(DAY.flights, DAY.seat_maps)
    assert {maps.cabin(leg.flight_id, leg.seats[0]) for leg in legs} == {race.cabin}
    seats = sorted(leg.seats[0] for leg in legs)
    assert race.seat in seats and len(set(seats)) == 2
    moved = next(c for c in outcomes if c.new_legs[0].seats != [race.seat])
    assert moved.rationale.endswith(
        f"seats reassigned at booking: {race.target.number} {race.seat} taken, got {moved.new_legs[0].seats[0]}"
    )
    store = SqliteStore(path)
    assert await store.seat_conflicts() == 0
    for outcome in outcomes:
        stored = await store.booking(outcome.booking_id)
        assert stored is not None and outcome.new_legs[0] in stored.legs  # the seat announced is the one sold
    await store.close()


@pytest.mark.parametrize("proposed", [True, False], ids=["seats-proposed", "seatless"])
async def test_a_decision_whose_cabin_filled_up_takes_its_first_fallback_with_room_and_is_not_redecided(
    bus: Bus, tmp_path: Path, proposed: bool
) -> None:
    race = _race(DAY)
    day = _full(DAY, race.target, race.cabin, race.seat)  # the seat is the flight's last in its cabin and above
    view = LiveView(day)
    t = race.target
    other = next(
        f for f in day.flights
        if (f.origin, f.destination) == (t.origin, t.destination) and f.flight_id != t.flight_id
        and any(s.cabin == race.cabin for s in view.free_seats(f.flight_id))
    )  # fmt: skip
    free = next(s.number for s in view.free_seats(other.flight_id) if s.cabin == race.cabin)
    # a fallback proposes seats, or none (as the offline policy's do): the store seats the passenger then
    fallback = [Leg(other.flight_id, other.number, other.origin, other.destination, other.departure, other.arrival,
                    race.cabin, [free] if proposed else [])]  # type: ignore[arg-type]  # fmt: skip
    cabin_free = [s for s in view.free_seats(other.flight_id) if s.cabin == race.cabin]
    a, b = (msgspec.structs.replace(race.decision(x), fallbacks=[fallback]) for x in (race.a, race.b))
    path = tmp_path / "bookings.sqlite3"
    rebooker = Rebooker(SqliteStore(path), day, load=True)
    ids = (race.a.booking_id, race.b.booking_id)
    async with run_agents(bus, rebooker):
        changed = expect_changes(bus, where=lambda c: c.booking_id in ids, count=2)
        async with changed:
            await bus.publish(a)
            await bus.publish(b)
        again = expect_changes(bus, where=lambda c: c.booking_id == race.b.booking_id)
        async with again:
            await bus.publish(b)  # redelivered: the recorded outcome again
    assert rebooker.rejected == 0  # no RebookRejected: nothing to re-decide
    by_booking = {c.booking_id: c for c in changed.items}
    first, second = by_booking[race.a.booking_id], by_booking[race.b.booking_id]  # a was applied first
    assert (first.new_legs[0].flight_id, first.new_legs[0].seats) == (t.flight_id, [race.seat])
    assert second.decision_id.startswith(f"{b.decision_id}+")  # after the target's higher cabins, all full
    assert (second.new_legs[0].flight_id, second.new_legs[0].cabin) == (other.flight_id, race.cabin)
    passengers = next(b for b in day.bookings if b.booking_id == race.b.booking_id).passengers
    assert second.new_legs[0].seats == ([free] if proposed else choose_seats(cabin_free, passengers))
    assert f"first choice full when booked ({t.flight_id}/{race.seat}); rebooked on {other.number}" in second.rationale
    assert again.items[0] == second
    assert (rebooker.applied, rebooker.fell_back) == (3, 2)
    store = SqliteStore(path)
    assert await store.seat_conflicts() == 0
    await store.close()


async def test_a_decision_whose_cabin_filled_up_is_upgraded_on_the_same_flight_when_a_higher_cabin_has_room(
    bus: Bus, tmp_path: Path
) -> None:
    race = _race(DAY)
    filler = filler_booking(DAY, race.target.flight_id, race.cabin, leave={race.seat})
    day = msgspec.structs.replace(DAY, bookings=[*DAY.bookings, filler])  # only the cabin is full
    path = tmp_path / "bookings.sqlite3"
    rebooker = Rebooker(SqliteStore(path), day, load=True)
    ids = (race.a.booking_id, race.b.booking_id)
    async with run_agents(bus, rebooker):
        async with expect_changes(bus, where=lambda c: c.booking_id in ids, count=2) as changed:
            await bus.publish(race.decision(race.a))
            await bus.publish(race.decision(race.b))
    by_booking = {c.booking_id: c for c in changed.items}
    upgraded = by_booking[race.b.booking_id].new_legs[0]
    assert upgraded.flight_id == race.target.flight_id  # same itinerary, a higher cabin: within the policy
    assert ("Y", "W", "J", "F").index(upgraded.cabin) > ("Y", "W", "J", "F").index(race.cabin)
    assert rebooker.rejected == 0
    maps = SeatMaps(day.flights, day.seat_maps)
    assert maps.cabin(upgraded.flight_id, upgraded.seats[0]) == upgraded.cabin
    store = SqliteStore(path)
    assert await store.seat_conflicts() == 0
    await store.close()


class _Watched(ReasonerAgent):
    """A reasoner replica that says when it held the seats of a group."""

    def __init__(self) -> None:
        super().__init__("offline")
        self.held_group = asyncio.Event()

    def hold(self, decisions: Sequence[Any]) -> None:  # as decided here, or as the view reads another's
        super().hold(decisions)
        if decisions and decisions[0].decision_id.startswith("other-"):
            self.held_group.set()


async def test_reasoner_replicas_hold_the_seats_every_replica_gave_out_and_a_new_one_replays_them(bus: Bus) -> None:
    race = _race(DAY)
    given = race.decision(race.a)
    group = RebookGroup(
        group_id="other-replica-1",
        decisions=[msgspec.structs.replace(given, decision_id=f"other-{given.decision_id}")],
    )
    first, second = _Watched(), _Watched()
    async with run_agents(bus, ContextAgent(DAY), first):
        async with Worker([second], bus):
            await bus.publish(group)  # as another replica would
            async with asyncio.timeout(10):
                await first.held_group.wait()
                await second.held_group.wait()
        # a replica started now replays the day's groups before it serves
        late = _Watched()
        async with Worker([late], bus):
            assert late.held_group.is_set()
    for replica in (first, second, late):
        assert race.seat in replica.held[race.target.flight_id]
