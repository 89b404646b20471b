"""The booking store: atomic, idempotent, never sells a seat twice, reseats a group whose proposed seats
were sold meanwhile. Same suite on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import msgspec
import psycopg
import pytest
import pytest_asyncio
from busagents_flight.data import AirlineDay, generate
from busagents_flight.policy import choose_seats
from busagents_flight.store import BookingStore, SeatMaps, SqliteStore
from busagents_flight.store_pg import PostgresStore
from busagents_flight.view import LiveView
from busagents_travel import Booking, BookingChanged, Disruption, Leg, Passenger, RebookPassenger, RebookRejected

PG_DSN = "postgresql://127.0.0.1:5432/test"


def _pg_unreachable() -> str:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=2):
            return ""
    except psycopg.OperationalError as exc:
        return f"PostgreSQL not reachable at {PG_DSN}: {str(exc).strip().splitlines()[0]}"


DAY = generate(flights=12, passengers=400, seed=5)
MAPS = SeatMaps(DAY.flights, DAY.seat_maps)


@pytest.fixture(scope="module")
def pg_skip_reason() -> str:
    return _pg_unreachable()


class StoreFactory(Protocol):
    def __call__(self, *, seat_maps: SeatMaps | None = None) -> BookingStore: ...


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

        def factory(*, seat_maps: SeatMaps | None = None) -> BookingStore:
            store = PostgresStore(PG_DSN, schema=schema, connections=2, seat_maps=seat_maps)
            made.append(store)
            return store
    else:
        path = tmp_path / "bookings.sqlite3"

        def factory(*, seat_maps: SeatMaps | None = None) -> BookingStore:
            store = SqliteStore(path, seat_maps=seat_maps)
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


async def test_decisions_applied_together_each_see_the_ones_before_them(make_store: StoreFactory) -> None:
    """A batch (decisions arriving together) reads what it needs at once: a second decision on a
    booking in the same batch sees the first one's change, a decision given twice is applied once, an
    unknown booking is rejected alone; the seats end where the last decision put them."""
    store = make_store(seat_maps=MAPS)
    booking = _single(DAY)
    first_flight, first_seats, cabin = _free_seat(DAY, booking)
    moved = _rebook(booking, first_flight, first_seats, cabin)
    second_flight, second_seats, _ = next(
        (f.flight_id, free, cabin)
        for f in DAY.flights
        if f.flight_id not in (first_flight, booking.legs[0].flight_id)
        for free in [[s.number for s in LiveView(DAY).free_seats(f.flight_id) if s.cabin == cabin][:1]]
        if free
    )
    again = msgspec.structs.replace(
        _rebook(booking, second_flight, second_seats, cabin, decision_id="d-again"),
        replaces=[first_flight],
        expected_version=booking.version + 1,
    )
    unknown = msgspec.structs.replace(moved, decision_id="d-unknown", booking_id="NO-SUCH-BOOKING")
    lead = _rebook(_single(DAY, {booking.booking_id}), *_free_seat(DAY, _single(DAY, {booking.booking_id})))
    outcomes = await asyncio.gather(*(store.apply(d) for d in (lead, moved, again, moved, unknown)))
    assert isinstance(outcomes[1], BookingChanged) and isinstance(outcomes[2], BookingChanged)
    assert msgspec.json.encode(outcomes[3]) == msgspec.json.encode(outcomes[1])  # the same decision: once
    assert isinstance(outcomes[4], RebookRejected) and outcomes[4].reason == "unknown_booking"
    assert outcomes[2].old_legs[0].flight_id == first_flight and outcomes[2].version == booking.version + 2
    after = await store.booking(booking.booking_id)
    assert after is not None and after.version == booking.version + 2
    assert [(leg.flight_id, leg.seats) for leg in after.legs] == [(second_flight, second_seats)]


async def test_without_seat_maps_a_seat_sold_meanwhile_is_rejected_and_nothing_of_the_decision_is_kept(
    make_store: StoreFactory,
) -> None:
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


async def test_a_decision_whose_legs_another_decision_already_replaced_keeps_the_booking_as_it_is(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    booking = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, booking, 2)
    first = await store.apply(_rebook(booking, flight_id, seats[:1], cabin, decision_id="first"))
    assert isinstance(first, BookingChanged)
    # decided on the old version, for the leg the first decision already moved the booking off
    late = await store.apply(_rebook(booking, flight_id, seats[1:], cabin, decision_id="late"))
    assert isinstance(late, BookingChanged)
    assert (late.action, late.new_legs, late.version) == ("keep", first.new_legs, first.version)
    assert late.rationale.endswith("the booking was already changed for another disruption")
    assert (await store.booking(booking.booking_id)).legs == first.new_legs  # type: ignore[union-attr]
    assert await store.seat_conflicts() == 0


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


async def test_sqlite_stores_on_one_file_take_turns_under_its_lock_file(tmp_path: Path) -> None:
    """A replica's transaction waits for the lock file another holds (woken when it is released, where
    SQLite's busy handler sleeps up to 100 ms a try), and goes ahead once it is."""
    path = tmp_path / "bookings.sqlite3"
    store = SqliteStore(path)
    await store.open()
    await store.load(DAY.bookings)
    booking = _single(DAY)
    flight_id, seats, cabin = _free_seat(DAY, booking)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another replica is writing
        applying = asyncio.create_task(store.apply(_rebook(booking, flight_id, seats, cabin)))
        done, _ = await asyncio.wait([applying], timeout=0.5)
        assert not done, "applied while another store held the lock"
        fcntl.flock(fd, fcntl.LOCK_UN)
        outcome = await asyncio.wait_for(applying, 10)
    finally:
        os.close(fd)
        await store.close()
    assert isinstance(outcome, BookingChanged) and outcome.new_legs[0].flight_id == flight_id


def _pairs_and_a_free_row(day: AirlineDay) -> tuple[Booking, Booking, str, list[str]]:
    """Two single-leg bookings of two passengers in one cabin, and a flight of neither with two rows
    of that cabin wholly free: (first, second, flight id, the first free row's seats)."""
    view = LiveView(day)
    pairs = [b for b in day.bookings if len(b.passengers) == 2 and len(b.legs) == 1]
    for first in pairs:
        cabin = first.legs[0].cabin
        second = next((b for b in pairs if b is not first and b.legs[0].cabin == cabin), None)
        if second is None:
            continue
        for flight in day.flights:
            if flight.flight_id in (first.legs[0].flight_id, second.legs[0].flight_id):
                continue
            free = {s.number for s in view.free_seats(flight.flight_id)}
            rows: dict[str, list[str]] = {}
            for seat in MAPS.seats(flight.flight_id, cabin):
                rows.setdefault(seat.number[:-1], []).append(seat.number)
            whole = [seats for seats in rows.values() if set(seats) <= free and len(seats) >= 2]
            if len(whole) >= 2:
                return first, second, flight.flight_id, whole[0][:2]
    raise AssertionError("no two pairs and a flight with two free rows in the sample day")


@pytest.mark.parametrize("replicas", [1, 2])
async def test_two_bookings_proposing_the_same_seats_are_both_seated_in_their_cabin(
    make_store: StoreFactory, replicas: int
) -> None:
    stores = [make_store(seat_maps=MAPS) for _ in range(replicas)]
    first, second, flight_id, seats = _pairs_and_a_free_row(DAY)
    cabin = first.legs[0].cabin
    outcomes = await asyncio.gather(
        stores[0].apply(_rebook(first, flight_id, seats, cabin)),
        stores[-1].apply(_rebook(second, flight_id, seats, cabin)),
    )
    assert all(isinstance(o, BookingChanged) for o in outcomes), outcomes
    changed = [o for o in outcomes if isinstance(o, BookingChanged)]
    given = [o.new_legs[0].seats for o in changed]
    assert seats in given  # one of them got the seats it proposed
    reseated = next(o for o in changed if o.new_legs[0].seats != seats)
    got = reseated.new_legs[0].seats
    assert not set(got) & set(seats)
    assert {MAPS.cabin(flight_id, s) for s in got} == {cabin}
    assert len({s[:-1] for s in got}) == 1  # together in one row: a free row was left
    assert reseated.rationale.endswith(f"seats reassigned at booking: {reseated.new_legs[0].number} "
                                       f"{', '.join(seats)} taken, got {', '.join(got)}")  # fmt: skip
    for outcome in changed:  # the booking as stored holds the seats the outcome announced
        after = await stores[0].booking(outcome.booking_id)
        assert after is not None and after.legs == outcome.new_legs
    audit = await stores[0].audit()
    assert audit.seat_conflicts == 0


async def test_a_replayed_decision_whose_seats_were_reassigned_gets_the_same_seats(make_store: StoreFactory) -> None:
    store = make_store(seat_maps=MAPS)
    first, second, flight_id, seats = _pairs_and_a_free_row(DAY)
    cabin = first.legs[0].cabin
    assert isinstance(await store.apply(_rebook(first, flight_id, seats, cabin)), BookingChanged)
    decision = _rebook(second, flight_id, seats, cabin)
    outcome = await store.apply(decision)
    assert isinstance(outcome, BookingChanged) and outcome.new_legs[0].seats != seats
    again = await make_store(seat_maps=MAPS).apply(decision)  # another replica, after a redelivery
    assert msgspec.json.encode(again) == msgspec.json.encode(outcome)
    after = await store.booking(second.booking_id)
    assert after is not None and after.version == second.version + 1
    assert after.legs == outcome.new_legs
    assert await store.seat_conflicts() == 0


def filler_booking(day: AirlineDay, flight_id: str, cabin: str, leave: set[str]) -> Booking:
    """A booking holding every free seat of ``cabin`` on ``flight_id`` except ``leave``."""
    view = LiveView(day)
    seats = [s.number for s in view.free_seats(flight_id) if s.cabin == cabin and s.number not in leave]
    f = next(f for f in day.flights if f.flight_id == flight_id)
    leg = Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, cabin, seats)  # type: ignore[arg-type]
    people = [Passenger(f"FILL-{i}", "Seat Filler") for i in range(len(seats))]
    return Booking("FILL", people, [leg], day.bookings[0].fare)


async def test_a_cabin_with_fewer_free_seats_than_passengers_rejects_with_the_taken_seats(
    make_store: StoreFactory,
) -> None:
    store = make_store(seat_maps=MAPS)
    group, _, flight_id, seats = _pairs_and_a_free_row(DAY)
    cabin = group.legs[0].cabin
    filler = filler_booking(DAY, flight_id, cabin, leave={seats[1]})  # the cabin keeps one free seat for two passengers
    await store.load([*DAY.bookings, filler])
    outcome = await store.apply(_rebook(group, flight_id, seats, cabin))
    assert isinstance(outcome, RebookRejected)
    assert outcome.reason == "seat_taken"
    assert outcome.taken_seats == [f"{flight_id}/{seats[0]}"]
    assert outcome.current == group
    assert await store.booking(group.booking_id) == group  # nothing of the decision was kept
    single = next(
        b for b in DAY.bookings if len(b.passengers) == 1 and len(b.legs) == 1 and b.legs[0].flight_id != flight_id
    )
    last = await store.apply(_rebook(single, flight_id, [seats[0]], cabin))  # one passenger: the last seat
    assert isinstance(last, BookingChanged) and last.new_legs[0].seats == [seats[1]]
    assert await store.seat_conflicts() == 0


async def test_a_leg_without_seats_has_the_group_seated_by_the_policys_rules_among_the_free_seats(
    make_store: StoreFactory,
) -> None:
    store = make_store(seat_maps=MAPS)
    group, other, flight_id, _ = _pairs_and_a_free_row(DAY)
    cabin = group.legs[0].cabin
    decision = _rebook(group, flight_id, [], cabin)
    outcome = await store.apply(decision)
    assert isinstance(outcome, BookingChanged), outcome
    view = LiveView(DAY)
    free = [s for s in view.free_seats(flight_id) if s.cabin == cabin]
    expected = choose_seats(free, group.passengers)
    assert expected is not None and outcome.new_legs[0].seats == expected  # the policy's choice
    assert len({s[:-1] for s in expected}) == 1  # together: the flight has wholly free rows
    assert outcome.rationale.endswith(f"{outcome.new_legs[0].number} seated at booking: {', '.join(expected)}")
    after = await store.booking(group.booking_id)
    assert after is not None and after.legs == outcome.new_legs
    again = await make_store(seat_maps=MAPS).apply(decision)  # a redelivery: the same seats, recorded
    assert msgspec.json.encode(again) == msgspec.json.encode(outcome)
    # a cabin without room for the group: rejected, naming the flight and cabin, nothing kept
    filler = filler_booking(DAY, flight_id, cabin, leave=set())
    await store.load([*DAY.bookings, filler])  # the day again, the cabin's free seats all sold
    rejected = await store.apply(_rebook(other, flight_id, [], cabin))
    assert isinstance(rejected, RebookRejected) and rejected.reason == "seat_taken"
    assert rejected.taken_seats == [f"{flight_id}/{cabin}"]
    assert await store.booking(other.booking_id) == other
    assert await store.seat_conflicts() == 0


async def test_decisions_applied_as_many_give_each_its_outcome_in_order_and_the_same_again(
    make_store: StoreFactory,
) -> None:
    store = make_store(seat_maps=MAPS)
    first, second, flight_id, seats = _pairs_and_a_free_row(DAY)
    cabin = first.legs[0].cabin
    unknown = msgspec.structs.replace(_rebook(first, flight_id, seats, cabin, "d-none"), booking_id="NO-SUCH")
    decisions = [
        msgspec.structs.replace(_rebook(b, flight_id, seats, cabin), rationale="why") for b in (first, second)
    ] + [unknown]
    batches: list[int] = []
    if isinstance(store, SqliteStore):  # one transaction for all three: one call of the store's thread
        apply_many = store._apply_many

        def counted(batch: list[RebookPassenger]) -> list[BookingChanged | RebookRejected | Exception]:
            batches.append(len(batch))
            return apply_many(batch)

        store._apply_many = counted  # type: ignore[method-assign,assignment]
    outcomes = await store.apply_many(decisions)
    assert batches == ([3] if isinstance(store, SqliteStore) else [])
    assert [type(o).__name__ for o in outcomes] == ["BookingChanged", "BookingChanged", "RebookRejected"]
    a, b, c = outcomes
    assert isinstance(a, BookingChanged) and isinstance(b, BookingChanged) and isinstance(c, RebookRejected)
    given = [a.new_legs[0].seats, b.new_legs[0].seats]
    assert seats in given and not set(given[0]) & set(given[1])  # one got them, the other was reseated
    as_proposed, reseated = (a, b) if given[0] == seats else (b, a)
    assert as_proposed.rationale == "why"  # seated as proposed: nothing to add
    assert reseated.rationale.startswith("why; seats reassigned at booking: ")
    assert c.reason == "unknown_booking"
    again = await make_store(seat_maps=MAPS).apply_many(decisions)  # redelivered: recorded outcomes
    assert [msgspec.json.encode(o) for o in again] == [msgspec.json.encode(o) for o in outcomes]
    assert await store.seat_conflicts() == 0


async def test_postgres_waits_for_a_transaction_selling_the_seat_then_reseats_the_group(pg_skip_reason: str) -> None:
    if pg_skip_reason:
        pytest.skip(pg_skip_reason)
    schema = f"flight_test_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(PG_DSN, schema=schema, connections=1, seat_maps=MAPS)
    await store.open()
    await store.load(DAY.bookings)
    _, group, flight_id, seats = _pairs_and_a_free_row(DAY)
    try:
        async with (
            await psycopg.AsyncConnection.connect(PG_DSN) as seller,
            await psycopg.AsyncConnection.connect(PG_DSN, autocommit=True) as watcher,
        ):
            await seller.execute(f"SET search_path TO {schema}")
            await seller.execute("INSERT INTO seats VALUES (%s, %s, 'HOLD', 'HOLD-1')", (flight_id, seats[0]))
            applying = asyncio.create_task(store.apply(_rebook(group, flight_id, seats, group.legs[0].cabin)))
            blocked = "SELECT 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
            async with asyncio.timeout(10):  # until the store's insert waits for the seller's row
                while await (await watcher.execute(blocked, (seller.info.backend_pid,))).fetchone() is None:
                    assert not applying.done(), applying.result()
            await seller.commit()
            outcome = await applying
            sold = await watcher.execute(
                f"SELECT seat FROM {schema}.seats WHERE booking_id = %s AND flight_id = %s ORDER BY seat",
                (group.booking_id, flight_id),
            )
            sold_seats = [r[0] for r in await sold.fetchall()]  # the first, partly sold attempt was undone
        assert isinstance(outcome, BookingChanged)
        got = outcome.new_legs[0].seats
        assert seats[0] not in got and len({s[:-1] for s in got}) == 1
        assert sold_seats == sorted(got)
        assert outcome.rationale.endswith(f"{seats[0]} taken, got {', '.join(got)}")
        after = await store.booking(group.booking_id)
        assert after is not None and after.legs == outcome.new_legs
    finally:
        await store.drop()
        await store.close()


async def test_postgres_says_when_it_creates_its_schema_in_the_database(
    pg_skip_reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    if pg_skip_reason:
        pytest.skip(pg_skip_reason)
    schema = f"flight_test_{uuid.uuid4().hex[:10]}"
    first, second = (PostgresStore(PG_DSN, schema=schema, connections=1) for _ in range(2))
    try:
        with caplog.at_level("WARNING", logger="busagents_flight.store"):
            await first.open()
            created = [r.getMessage() for r in caplog.records]
            caplog.clear()
            await second.open()  # the schema is there now: nothing to say
        assert created == [
            f"created schema {schema} in PostgreSQL database test ({PG_DSN}) for the flight bookings; "
            f"drop it with: DROP SCHEMA {schema} CASCADE"
        ]
        assert caplog.records == []
    finally:
        await first.drop()
        await first.close()
        await second.close()


async def test_loading_an_older_sqlite_store_gives_its_seats_table_the_current_layout(tmp_path: Path) -> None:
    """A store made before the seats table kept its rows in primary-key order (WITHOUT ROWID), with an
    index of the seats by booking, is served as it is, and loading the day makes the table again as it is
    now made, without that index."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "CREATE TABLE seats (flight_id TEXT NOT NULL, seat TEXT NOT NULL, booking_id TEXT NOT NULL, "
            "passenger_id TEXT NOT NULL, PRIMARY KEY (flight_id, seat))"
        )
        conn.execute("CREATE INDEX seats_by_booking ON seats (booking_id)")  # no longer kept
        conn.commit()

    def layout() -> str:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return str(conn.execute("SELECT sql FROM sqlite_master WHERE name = 'seats'").fetchone()[0])

    def indexes() -> list[str]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
            return [r[0] for r in rows]

    store = SqliteStore(path, seat_maps=MAPS)
    await store.open()
    try:
        assert "WITHOUT ROWID" not in layout()
        assert indexes() == ["seats_by_booking"]
        await store.load(DAY.bookings)
        assert "WITHOUT ROWID" in layout()
        assert indexes() == []
        booking = _single(DAY)
        changed = await store.apply(_rebook(booking, *_free_seat(DAY, booking)))
        assert isinstance(changed, BookingChanged)
    finally:
        await store.close()
