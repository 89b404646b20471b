"""The booking store: atomic, idempotent, never sells a seat twice. Same suite on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import psycopg
import pytest
import pytest_asyncio
from busagents_flight.data import AirlineDay, generate
from busagents_flight.store import BookingStore, SqliteStore
from busagents_flight.store_pg import PostgresStore
from busagents_flight.view import LiveView
from busagents_travel import Booking, BookingChanged, Disruption, Leg, RebookPassenger, RebookRejected

PG_DSN = "postgresql://127.0.0.1:5432/test"


def _pg_unreachable() -> str:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=2):
            return ""
    except psycopg.OperationalError as exc:
        return f"PostgreSQL not reachable at {PG_DSN}: {str(exc).strip().splitlines()[0]}"


DAY = generate(flights=12, passengers=400, seed=5)


@pytest.fixture(scope="module")
def pg_skip_reason() -> str:
    return _pg_unreachable()


StoreFactory = Callable[[], BookingStore]


@pytest_asyncio.fixture(params=["sqlite", "postgres"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path, pg_skip_reason: str
) -> AsyncIterator[StoreFactory]:
    """Makes stores over one database (several stores = several connections, like replicas)."""
    made: list[BookingStore] = []
    if request.param == "postgres":
        if pg_skip_reason:
            pytest.skip(pg_skip_reason)
        schema = f"flight_test_{uuid.uuid4().hex[:10]}"

        def factory() -> BookingStore:
            store = PostgresStore(PG_DSN, schema=schema, connections=2)
            made.append(store)
            return store
    else:
        path = tmp_path / "bookings.sqlite3"

        def factory() -> BookingStore:
            store = SqliteStore(path)
            made.append(store)
            return store

    first = factory()
    await first.open()
    await first.load(DAY.bookings)
    try:
        yield factory
    finally:
        if isinstance(first, PostgresStore):
            await first.drop()
        for store in made:
            await store.close()


def _disruption(flight_id: str) -> Disruption:
    return Disruption(
        disruption_id=f"{flight_id}#1", kind="cancelled", flight_id=flight_id, number="BX1", origin="X",
        destination="Y", observed_at=0,
    )  # fmt: skip


def _single(day: AirlineDay, skip: set[str] = frozenset()) -> Booking:  # type: ignore[assignment]
    return next(b for b in day.bookings if len(b.passengers) == 1 and len(b.legs) == 1 and b.booking_id not in skip)


def _free_seat(day: AirlineDay, booking: Booking, n: int = 1) -> tuple[str, list[str], str]:
    """A flight other than the booking's with ``n`` free seats in its cabin: (flight id, seats, cabin)."""
    view = LiveView(day)
    cabin = booking.legs[0].cabin
    for flight in day.flights:
        if flight.flight_id == booking.legs[0].flight_id:
            continue
        free = [s.number for s in view.free_seats(flight.flight_id) if s.cabin == cabin]
        if len(free) >= n:
            return flight.flight_id, free[:n], cabin
    raise AssertionError("no free seat in the sample day")


def _rebook(booking: Booking, flight_id: str, seats: list[str], cabin: str, decision_id: str = "") -> RebookPassenger:
    f = next(f for f in DAY.flights if f.flight_id == flight_id)
    leg = Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, cabin, seats)  # type: ignore[arg-type]
    return RebookPassenger(
        decision_id=decision_id or f"d-{booking.booking_id}-{flight_id}",
        disruption=_disruption(booking.legs[0].flight_id),
        booking_id=booking.booking_id,
        action="rebook",
        passenger_ids=[p.passenger_id for p in booking.passengers],
        replaces=[booking.legs[0].flight_id],
        new_legs=[leg],
        expected_version=booking.version,
    )


async def test_rebooking_moves_the_seats_and_bumps_the_version(make_store: StoreFactory) -> None:
    store = make_store()
    booking = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, booking)
    outcome = await store.apply(_rebook(booking, flight_id, seats, cabin))
    assert isinstance(outcome, BookingChanged)
    assert outcome.old_legs == booking.legs
    after = await store.booking(booking.booking_id)
    assert after is not None
    assert [leg.flight_id for leg in after.legs] == [flight_id]
    assert after.legs[0].seats == seats
    assert after.version == booking.version + 1 == outcome.version
    assert await store.seat_conflicts() == 0


async def test_applying_the_same_decision_twice_changes_the_booking_once(make_store: StoreFactory) -> None:
    store = make_store()
    booking = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, booking)
    decision = _rebook(booking, flight_id, seats, cabin)
    first = await store.apply(decision)
    again = await store.apply(decision)
    assert msgspec.json.encode(first) == msgspec.json.encode(again)
    after = await store.booking(booking.booking_id)
    assert after is not None and after.version == booking.version + 1


async def test_a_seat_sold_meanwhile_is_rejected_and_nothing_of_the_decision_is_kept(make_store: StoreFactory) -> None:
    store = make_store()
    winner = _single(DAY)
    loser = _single(DAY, {winner.booking_id})
    flight_id, seats, cabin = _free_seat(DAY, winner)
    assert isinstance(await store.apply(_rebook(winner, flight_id, seats, cabin)), BookingChanged)
    if loser.legs[0].cabin != cabin:
        loser = next(b for b in DAY.bookings if len(b.passengers) == 1 and b.legs[0].cabin == cabin and b is not winner)
    outcome = await store.apply(_rebook(loser, flight_id, seats, cabin))
    assert isinstance(outcome, RebookRejected)
    assert outcome.reason == "seat_taken"
    assert outcome.taken_seats == [f"{flight_id}/{seats[0]}"]
    assert await store.booking(loser.booking_id) == loser
    assert await store.seat_conflicts() == 0


async def test_a_decision_on_an_old_version_is_rejected_as_stale(make_store: StoreFactory) -> None:
    store = make_store()
    booking = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, booking)
    decision = msgspec.structs.replace(_rebook(booking, flight_id, seats, cabin), expected_version=booking.version + 3)
    outcome = await store.apply(decision)
    assert isinstance(outcome, RebookRejected)
    assert outcome.reason == "stale"
    assert outcome.current == booking


async def test_a_refund_releases_the_seats(make_store: StoreFactory) -> None:
    store = make_store()
    refunded = _single(DAY)
    refund = RebookPassenger(
        decision_id="refund-1",
        disruption=_disruption(refunded.legs[0].flight_id),
        booking_id=refunded.booking_id,
        action="refund",
        passenger_ids=[p.passenger_id for p in refunded.passengers],
        expected_version=refunded.version,
    )
    outcome = await store.apply(refund)
    assert isinstance(outcome, BookingChanged) and outcome.action == "refund"
    after = await store.booking(refunded.booking_id)
    assert after is not None and after.status == "refunded"
    other = next(
        b for b in DAY.bookings if len(b.passengers) == 1 and b.legs[0].cabin == refunded.legs[0].cabin
        and b.legs[0].flight_id != refunded.legs[0].flight_id
    )  # fmt: skip
    leg = refunded.legs[0]
    taken_back = await store.apply(_rebook(other, leg.flight_id, leg.seats, leg.cabin))
    assert isinstance(taken_back, BookingChanged)


async def test_two_stores_racing_for_one_seat_sell_it_once(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()
    first = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, first)
    second = next(
        x for x in DAY.bookings if len(x.passengers) == 1 and x.legs[0].cabin == cabin and x is not first
        and x.legs[0].flight_id != flight_id
    )  # fmt: skip
    outcomes = await asyncio.gather(
        a.apply(_rebook(first, flight_id, seats, cabin)), b.apply(_rebook(second, flight_id, seats, cabin))
    )
    assert sorted(type(o).__name__ for o in outcomes) == ["BookingChanged", "RebookRejected"]
    assert await a.seat_conflicts() == 0
