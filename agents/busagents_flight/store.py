"""The booking store: the system of record the rebooker acts on.

Its one side effect is :meth:`BookingStore.apply`: it applies a ``RebookPassenger``
decision atomically (all of its seats and the booking, or nothing) and
idempotently (the outcome is recorded under the decision id, and replaying the
decision returns the recorded outcome). A seat is sold at most once, enforced by
the primary key ``(flight_id, seat)`` of the seats table, so two rebookers racing
for the last seat cannot both win: the loser gets a ``seat_taken`` rejection.

SQLite is the default (a file); PostgreSQL is used when the store is a
``postgresql://`` DSN (see :mod:`busagents_flight.store_pg`).
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from busagents_travel import Booking, BookingChanged, Leg, RebookPassenger, RebookRejected

from busagents import ConfigError

__all__ = [
    "Audit",
    "BookingStore",
    "Outcome",
    "SqliteStore",
    "decide_outcome",
    "decode_outcome",
    "encode_outcome",
    "open_store",
    "seat_rows",
]

Outcome = BookingChanged | RebookRejected
T = TypeVar("T")

_encode = msgspec.json.Encoder().encode
_decode_booking = msgspec.json.Decoder(Booking).decode


class _SeatedLeg(msgspec.Struct):
    flight_id: str
    seats: list[str]


class _Seating(msgspec.Struct):
    """The part of a booking document the seat audit reads."""

    legs: list[_SeatedLeg]
    status: str = "active"


_decode_seating = msgspec.json.Decoder(_Seating).decode


class Audit(msgspec.Struct, frozen=True):
    """What :meth:`BookingStore.audit` found."""

    seat_conflicts: int
    stranded_bookings: int


class _Recorded(msgspec.Struct, omit_defaults=True):
    """A decision's outcome as the decisions table keeps it."""

    changed: BookingChanged | None = None
    rejected: RebookRejected | None = None


_decode_recorded = msgspec.json.Decoder(_Recorded).decode


def encode_outcome(outcome: Outcome) -> str:
    recorded = _Recorded(changed=outcome) if isinstance(outcome, BookingChanged) else _Recorded(rejected=outcome)
    return _encode(recorded).decode()


def decode_outcome(data: str | bytes) -> Outcome:
    recorded = _decode_recorded(data)
    outcome = recorded.changed or recorded.rejected
    if outcome is None:
        raise ValueError("empty recorded outcome")
    return outcome


SEATS_INDEX = "CREATE INDEX IF NOT EXISTS seats_by_booking ON seats (booking_id)"
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS bookings (
        booking_id TEXT PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS seats (
        flight_id TEXT NOT NULL, seat TEXT NOT NULL, booking_id TEXT NOT NULL, passenger_id TEXT NOT NULL,
        PRIMARY KEY (flight_id, seat))""",
    SEATS_INDEX,
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id TEXT PRIMARY KEY, booking_id TEXT NOT NULL, outcome TEXT NOT NULL)""",
)


class BookingStore(abc.ABC):
    """Bookings, seats sold, and the outcome of every decision applied."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if needed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection."""

    @abc.abstractmethod
    async def load(self, bookings: Iterable[Booking]) -> None:
        """Replace the store's content with ``bookings`` (the start of the day)."""

    @abc.abstractmethod
    async def apply(self, decision: RebookPassenger) -> Outcome:
        """Apply ``decision`` atomically and idempotently; the outcome to publish."""

    @abc.abstractmethod
    async def booking(self, booking_id: str) -> Booking | None:
        """One booking as the store has it now."""

    @abc.abstractmethod
    async def is_empty(self) -> bool:
        """True before the day's bookings were loaded."""

    async def seat_conflicts(self) -> int:
        """Seats held by more than one passenger across the booking documents (must be 0)."""
        return (await self.audit()).seat_conflicts

    async def audit(self, cancelled: Iterable[str] = ()) -> Audit:
        """Check the booking documents themselves, independently of the seats table's primary key:
        seats held twice, and active bookings still holding a leg on a ``cancelled`` flight."""
        cancelled = set(cancelled)
        seen: set[tuple[str, str]] = set()
        conflicts = stranded = 0
        for doc in await self.documents():
            booking = _decode_seating(doc)
            if booking.status != "active":
                continue
            if any(leg.flight_id in cancelled for leg in booking.legs):
                stranded += 1
            for leg in booking.legs:
                for seat in leg.seats:
                    key = (leg.flight_id, seat)
                    if key in seen:
                        conflicts += 1
                    seen.add(key)
        return Audit(seat_conflicts=conflicts, stranded_bookings=stranded)

    @abc.abstractmethod
    async def documents(self) -> list[str]:
        """Every booking as stored (JSON)."""

    async def bookings(self) -> list[Booking]:
        """Every booking (for audits and tests)."""
        return [_decode_booking(doc) for doc in await self.documents()]

    async def __aenter__(self) -> BookingStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def open_store(location: str) -> BookingStore:
    """A store for ``location``: a ``postgresql://`` DSN, else an SQLite file path."""
    if location.startswith(("postgresql://", "postgres://")):
        from .store_pg import PostgresStore

        return PostgresStore(location)
    return SqliteStore(location)


def decide_outcome(decision: RebookPassenger, current: Booking | None) -> tuple[Outcome, Booking | None]:
    """What ``decision`` does to ``current``: the outcome and the new booking (None: rejected or unchanged).

    Pure: both stores call it inside their transaction, then write the seats.
    """
    d = decision

    def reject(reason: str, detail: str) -> tuple[Outcome, None]:
        return (
            RebookRejected(
                decision_id=d.decision_id,
                disruption=d.disruption,
                booking_id=d.booking_id,
                reason=reason,  # type: ignore[arg-type]
                passenger_ids=d.passenger_ids,
                detail=detail,
                current=current,
                attempt=d.attempt,
            ),
            None,
        )

    if current is None:
        return reject("unknown_booking", f"no booking {d.booking_id}")
    if d.action == "keep":
        return _changed(d, current, current.legs, current.legs, current.version), None
    if current.version != d.expected_version or current.status != "active":
        return reject(
            "stale", f"decided on version {d.expected_version}, booking is at {current.version} ({current.status})"
        )
    if sorted(d.passenger_ids) != sorted(p.passenger_id for p in current.passengers):
        return reject("invalid", "passenger ids do not match the booking")
    if d.action == "refund":
        updated = Booking(
            current.booking_id, current.passengers, current.legs, current.fare, "refunded", current.version + 1
        )
        return _changed(d, current, current.legs, [], updated.version), updated
    replaced = [leg for leg in current.legs if leg.flight_id in set(d.replaces)]
    if len(replaced) != len(d.replaces) or not d.new_legs:
        return reject("invalid", f"legs {d.replaces} are not all in the booking, or no new legs")
    n = len(current.passengers)
    if any(len(leg.seats) != n for leg in d.new_legs):
        return reject("invalid", f"every new leg needs {n} seats")
    order = {p.passenger_id: i for i, p in enumerate(current.passengers)}
    new_legs = [_reorder(leg, d.passenger_ids, order) for leg in d.new_legs]
    kept = [leg for leg in current.legs if leg.flight_id not in set(d.replaces)]
    legs = sorted([*kept, *new_legs], key=lambda leg: leg.departure)
    updated = Booking(current.booking_id, current.passengers, legs, current.fare, "active", current.version + 1)
    return _changed(d, current, replaced, new_legs, updated.version), updated


def _reorder(leg: Leg, passenger_ids: list[str], order: dict[str, int]) -> Leg:
    seats = [""] * len(leg.seats)
    for pid, seat in zip(passenger_ids, leg.seats, strict=True):
        seats[order[pid]] = seat
    return msgspec.structs.replace(leg, seats=seats)


def _changed(d: RebookPassenger, current: Booking, old: list[Leg], new: list[Leg], version: int) -> BookingChanged:
    return BookingChanged(
        decision_id=d.decision_id,
        disruption_id=d.disruption.disruption_id,
        booking_id=d.booking_id,
        flight_id=d.disruption.flight_id,
        action=d.action,
        passengers=current.passengers,
        old_legs=old,
        new_legs=new,
        cost=d.cost,
        hotel=d.hotel,
        rationale=d.rationale,
        version=version,
    )


class SqliteStore(BookingStore):
    """The booking store in an SQLite file (WAL); each apply is one ``BEGIN IMMEDIATE`` transaction.

    One connection on one thread of its own per store: the event loop never blocks
    on the file, and the transactions of one store queue up instead of spinning in
    SQLite's busy handler. Several stores on one file (replicas) lock each other out
    through SQLite.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._pending: list[tuple[RebookPassenger, asyncio.Future[Outcome]]] = []
        self._batch = asyncio.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as exc:
                raise ConfigError(f"cannot open the SQLite booking store {self.path}: {exc}") from None
            conn.execute("PRAGMA synchronous=NORMAL")
            self._connection = conn
        return self._connection

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        conn = self._conn()
        for statement in SCHEMA:
            conn.execute(statement)

    async def close(self) -> None:
        if self._executor is not None:
            await self._run(self._close)
            self._executor.shutdown(wait=True)
            self._executor = None

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def load(self, bookings: Iterable[Booking]) -> None:
        await self._run(self._load, list(bookings))

    def _load(self, bookings: list[Booking]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM bookings")
            conn.execute("DELETE FROM seats")
            conn.execute("DELETE FROM decisions")
            conn.execute("DROP INDEX IF EXISTS seats_by_booking")  # faster to build once, after the rows
            conn.executemany(
                "INSERT INTO bookings VALUES (?, ?, ?, ?)",
                ((b.booking_id, b.version, b.status, _encode(b).decode()) for b in bookings),
            )
            conn.executemany("INSERT INTO seats VALUES (?, ?, ?, ?)", seat_rows(bookings))
            conn.execute(SEATS_INDEX)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def apply(self, decision: RebookPassenger) -> Outcome:
        """Apply ``decision``; decisions arriving together share one transaction (group commit).

        Each decision keeps its own atomicity (a savepoint), and no outcome is
        returned before the transaction holding it committed.
        """
        done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((decision, done))
        async with self._batch:
            if not done.done():  # nobody took it into their batch: lead one
                batch, self._pending = self._pending, []
                try:
                    results = await self._run(self._apply_many, [d for d, _ in batch])
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    raise
                for (_, fut), result in zip(batch, results, strict=True):
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        return done.result()

    def _apply_many(self, decisions: list[RebookPassenger]) -> list[Outcome | Exception]:
        conn = self._conn()
        results: list[Outcome | Exception] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for decision in decisions:
                conn.execute("SAVEPOINT one")
                try:
                    results.append(self._apply_one(conn, decision))
                except Exception as exc:  # this decision fails alone
                    conn.execute("ROLLBACK TO one")
                    results.append(exc)
                conn.execute("RELEASE one")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    def _apply_one(self, conn: sqlite3.Connection, decision: RebookPassenger) -> Outcome:
        row = conn.execute("SELECT outcome FROM decisions WHERE decision_id = ?", (decision.decision_id,)).fetchone()
        if row is not None:  # applied before: the same outcome again
            return decode_outcome(row[0])
        row = conn.execute("SELECT doc FROM bookings WHERE booking_id = ?", (decision.booking_id,)).fetchone()
        current = _decode_booking(row[0]) if row is not None else None
        outcome, updated = decide_outcome(decision, current)
        if updated is not None:
            conn.execute("SAVEPOINT write")
            conflict = self._write(conn, decision, updated)
            if conflict:
                conn.execute("ROLLBACK TO write")
                outcome = RebookRejected(
                    decision_id=decision.decision_id,
                    disruption=decision.disruption,
                    booking_id=decision.booking_id,
                    reason="seat_taken",
                    passenger_ids=decision.passenger_ids,
                    detail=f"already sold: {', '.join(conflict)}",
                    taken_seats=conflict,
                    current=current,
                    attempt=decision.attempt,
                )
            conn.execute("RELEASE write")
        conn.execute(
            "INSERT INTO decisions VALUES (?, ?, ?)",
            (decision.decision_id, decision.booking_id, encode_outcome(outcome)),
        )
        return outcome

    def _write(self, conn: sqlite3.Connection, decision: RebookPassenger, updated: Booking) -> list[str]:
        """Move the seats and store the booking; the seats already sold to others (then nothing is kept)."""
        booking_id = updated.booking_id
        if decision.action == "refund":
            conn.execute("DELETE FROM seats WHERE booking_id = ?", (booking_id,))
        else:
            conn.executemany(
                "DELETE FROM seats WHERE booking_id = ? AND flight_id = ?", ((booking_id, f) for f in decision.replaces)
            )
            new = [(leg.flight_id, s) for leg in decision.new_legs for s in leg.seats]
            conflict = [
                f"{f}/{s}"
                for f, s in new
                if conn.execute("SELECT 1 FROM seats WHERE flight_id = ? AND seat = ?", (f, s)).fetchone() is not None
            ]
            if conflict:
                return conflict
            conn.executemany("INSERT INTO seats VALUES (?, ?, ?, ?)", seat_rows([updated], only=decision.new_legs))
        conn.execute(
            "UPDATE bookings SET version = ?, status = ?, doc = ? WHERE booking_id = ?",
            (updated.version, updated.status, _encode(updated).decode(), booking_id),
        )
        return []

    async def booking(self, booking_id: str) -> Booking | None:
        row = await self._run(self._one, "SELECT doc FROM bookings WHERE booking_id = ?", (booking_id,))
        return _decode_booking(row[0]) if row is not None else None

    async def is_empty(self) -> bool:
        return await self._run(self._one, "SELECT 1 FROM bookings LIMIT 1", ()) is None

    async def documents(self) -> list[str]:
        rows = await self._run(self._all, "SELECT doc FROM bookings ORDER BY booking_id", ())
        return [r[0] for r in rows]

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        return self._conn().execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return self._conn().execute(sql, args).fetchall()


def seat_rows(bookings: list[Booking], only: list[Leg] | None = None) -> Iterable[tuple[str, str, str, str]]:
    """Rows of the seats table (flight, seat, booking, passenger); ``only``: just these legs' flights."""
    for b in bookings:
        flights = {leg.flight_id for leg in only} if only is not None else None
        for leg in b.legs:
            if flights is not None and leg.flight_id not in flights:
                continue
            for p, seat in zip(b.passengers, leg.seats, strict=True):
                yield (leg.flight_id, seat, b.booking_id, p.passenger_id)
