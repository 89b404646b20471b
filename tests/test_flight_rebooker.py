"""Two rebooker replicas racing for the last seat: one passenger gets it, the other is re-decided."""

from __future__ import annotations

from pathlib import Path

from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.rebooker import Rebooker
from busagents_flight.store import SqliteStore
from busagents_flight.view import LiveView
from busagents_travel import BookingChanged, Disruption, Leg, RebookPassenger, RebookRejected

from busagents import Bus, Worker
from busagents.testing import run_agents

DAY = generate(flights=24, passengers=1500, seed=9)


async def test_two_rebookers_racing_for_one_seat_sell_it_once_and_the_loser_is_redecided(
    bus: Bus, tmp_path: Path
) -> None:
    # two single-passenger bookings on one cancelled flight, both decided onto the same free seat
    cancelled = next(
        f for f in DAY.flights
        if sum(1 for b in DAY.bookings if len(b.passengers) == 1 and b.legs[0].flight_id == f.flight_id) >= 2
    )  # fmt: skip
    a, b = [x for x in DAY.bookings if len(x.passengers) == 1 and x.legs[0].flight_id == cancelled.flight_id][:2]
    view = LiveView(DAY)
    target = next(
        f for f in DAY.flights
        if f.origin == cancelled.origin and f.destination == a.legs[-1].destination
        and f.flight_id != cancelled.flight_id
        and len([s for s in view.free_seats(f.flight_id) if s.cabin == a.legs[0].cabin]) >= 2
    )  # fmt: skip
    cabin = a.legs[0].cabin
    seat = next(s.number for s in view.free_seats(target.flight_id) if s.cabin == cabin)
    disruption = Disruption(
        disruption_id=f"{cancelled.flight_id}#1", kind="cancelled", flight_id=cancelled.flight_id,
        number=cancelled.number, origin=cancelled.origin, destination=cancelled.destination,
        observed_at=cancelled.departure - 4 * 3600,
    )  # fmt: skip
    leg = Leg(target.flight_id, target.number, target.origin, target.destination, target.departure, target.arrival,
              cabin, [seat])  # fmt: skip

    def decision(booking_id: str, version: int, pids: list[str]) -> RebookPassenger:
        return RebookPassenger(
            decision_id=f"race-{booking_id}", disruption=disruption, booking_id=booking_id, action="rebook",
            passenger_ids=pids, replaces=[cancelled.flight_id], new_legs=[leg], expected_version=version,
        )  # fmt: skip

    path = tmp_path / "bookings.sqlite3"
    first = Rebooker(SqliteStore(path), DAY, load=True)
    second = Rebooker(SqliteStore(path), DAY)
    async with run_agents(bus, ContextAgent(DAY), ReasonerAgent("offline"), first):
        async with Worker([second], bus):
            changed = bus.expect(BookingChanged, where=lambda c: c.booking_id in (a.booking_id, b.booking_id), count=2)
            rejected = bus.expect(RebookRejected, where=lambda r: r.booking_id in (a.booking_id, b.booking_id))
            async with changed, rejected:
                await bus.publish(decision(a.booking_id, a.version, [a.passengers[0].passenger_id]))
                await bus.publish(decision(b.booking_id, b.version, [b.passengers[0].passenger_id]))
    loser = rejected.message.body
    assert loser.reason == "seat_taken"
    assert loser.taken_seats == [f"{target.flight_id}/{seat}"]
    by_booking = {m.body.booking_id: m.body for m in changed.messages}
    winner = by_booking[a.booking_id if loser.booking_id == b.booking_id else b.booking_id]
    redecided = by_booking[loser.booking_id]
    assert winner.new_legs[0].seats == [seat]
    assert redecided.decision_id.endswith("/2")  # the reasoner's second attempt
    assert (redecided.new_legs[0].flight_id, redecided.new_legs[0].seats) != (target.flight_id, [seat])
    store = SqliteStore(path)
    assert await store.seat_conflicts() == 0
    await store.close()
