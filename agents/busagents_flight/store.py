"""The booking store: the system of record the rebooker acts on.

Its one side effect is :meth:`BookingStore.apply`: it applies a ``RebookPassenger``
decision atomically (all of its seats and the booking, or nothing) and
idempotently (the outcome is recorded under the decision id, and replaying the
decision returns the recorded outcome). A seat is sold at most once, enforced by
the primary key ``(flight_id, seat)`` of the seats table.

The seats a decision names are a proposal: the store holds the inventory, so it
makes the final choice. When a proposed seat was sold meanwhile (another replica
of the reasoner picked it too), the store seats the group again in the same
cabin among the seats free inside its transaction (:func:`reseat`); only a cabin
without room for the whole group gives a ``seat_taken`` rejection.

SQLite is the default (a file); PostgreSQL is used when the store is a
``postgresql://`` DSN (see :mod:`busagents_flight.store_pg`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import msgspec
from busagents_travel import (
    Booking,
    BookingChanged,
    Cost,
    Flight,
    Leg,
    Passenger,
    RebookPassenger,
    RebookRejected,
    Seat,
)

from busagents import ConfigError

from .policy import choose_seats

__all__ = [
    "Audit",
    "BookingStore",
    "Outcome",
    "SeatMaps",
    "SeatTaken",
    "SqliteStore",
    "decide_outcome",
    "decode_outcome",
    "encode_outcome",
    "no_room",
    "open_store",
    "rejection",
    "reseat",
    "reseated",
    "seat_rows",
    "seat_taken",
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


#: The rows are kept in the primary key's order (no rowid table beside it): a rebooking deletes the
#: seats of one flight and inserts seats of another, and the pages it writes are those flights' (shared
#: by the bookings a disruption moves), not one more page per booking (13 % less CPU time for a storm's
#: decisions, a quarter fewer pages written). A store made before keeps its table until it is loaded.
#: No index by booking: a booking's seats are found from its document (its legs name them), so a
#: rebooking writes no index page beside the flights' own.
SEATS_TABLE = """CREATE TABLE IF NOT EXISTS seats (
        flight_id TEXT NOT NULL, seat TEXT NOT NULL, booking_id TEXT NOT NULL, passenger_id TEXT NOT NULL,
        PRIMARY KEY (flight_id, seat)) WITHOUT ROWID"""
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS bookings (
        booking_id TEXT PRIMARY KEY, version INTEGER NOT NULL, status TEXT NOT NULL, doc TEXT NOT NULL)""",
    SEATS_TABLE,
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id TEXT PRIMARY KEY, booking_id TEXT NOT NULL, outcome TEXT NOT NULL)""",
)


class SeatMaps:
    """Which seats each flight of the day has: its aircraft's seat map, by cabin."""

    def __init__(self, flights: Iterable[Flight], seat_maps: Mapping[str, list[Seat]]) -> None:
        self._aircraft = {f.flight_id: f.aircraft for f in flights}
        self._cabins = {name: {s.number: s.cabin for s in seats} for name, seats in seat_maps.items()}
        self._by_cabin: dict[tuple[str, str], list[Seat]] = {}
        for name, seats in seat_maps.items():
            for seat in seats:
                self._by_cabin.setdefault((name, seat.cabin), []).append(seat)

    def aircraft(self, flight_id: str) -> str | None:
        """The aircraft type flying ``flight_id`` (None: not a flight of the day)."""
        return self._aircraft.get(flight_id)

    def cabin(self, flight_id: str, seat: str) -> str | None:
        """The cabin of ``seat`` on ``flight_id`` (None: no such seat)."""
        aircraft = self._aircraft.get(flight_id)
        return self._cabins[aircraft].get(seat) if aircraft is not None else None

    def seats(self, flight_id: str, cabin: str) -> list[Seat]:
        """Every seat of ``cabin`` on ``flight_id``, front to back."""
        aircraft = self._aircraft.get(flight_id)
        return self._by_cabin.get((aircraft, cabin), []) if aircraft is not None else []


class SeatTaken(Exception):
    """Raised inside a store transaction: these seats (``flight/seat``) are sold and no others fit the group."""

    def __init__(self, seats: list[str]) -> None:
        super().__init__(", ".join(seats))
        self.seats = seats


class BookingStore(abc.ABC):
    """Bookings, seats sold, and the outcome of every decision applied.

    ``seat_maps``: what the store reseats from when a proposed seat is sold; without
    them such a decision is rejected as ``seat_taken`` (the rebooker always sets them).
    """

    seat_maps: SeatMaps | None = None

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

    async def apply_many(self, decisions: Sequence[RebookPassenger]) -> list[Outcome | Exception]:
        """Apply each of ``decisions`` as :meth:`apply` does, together (the store settles their order);
        each one's outcome, in the order given, or the exception that failed it alone."""
        results = await asyncio.gather(*(self.apply(d) for d in decisions), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # a cancellation is not a decision's failure
        return cast(list[Outcome | Exception], results)

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
        return rejection(d, reason, detail, current=current), None

    if current is None:
        return reject("unknown_booking", f"no booking {d.booking_id}")
    if d.action == "keep":
        return _changed(d, current, current.legs, current.legs, current.version), None
    if current.version != d.expected_version or current.status != "active":
        if current.status != "active" or not any(leg.flight_id in d.replaces for leg in current.legs):
            # another disruption's decision already moved the booking off what this one replaces (or
            # refunded it): nothing is left to decide, the passengers are told it stays as it is now
            note = f"{d.disruption.number}: the booking was already changed for another disruption"
            moot = msgspec.structs.replace(
                d, action="keep", replaces=[], new_legs=[], fallbacks=[], cost=Cost(), hotel=False, rationale=note
            )
            return _changed(moot, current, current.legs, current.legs, current.version), None
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
    if any(leg.seats and (len(set(leg.seats)) != n or len(leg.seats) != n) for leg in d.new_legs):
        return reject("invalid", f"every new leg needs {n} different seats, or none (the store seats the group)")
    order = {p.passenger_id: i for i, p in enumerate(current.passengers)}
    new_legs = [_reorder(leg, d.passenger_ids, order) for leg in d.new_legs]
    kept = [leg for leg in current.legs if leg.flight_id not in set(d.replaces)]
    legs = sorted([*kept, *new_legs], key=lambda leg: leg.departure)
    updated = Booking(current.booking_id, current.passengers, legs, current.fare, "active", current.version + 1)
    return _changed(d, current, replaced, new_legs, updated.version), updated


def reseat(leg: Leg, passengers: list[Passenger], sold: Collection[str], seat_maps: SeatMaps | None) -> Leg | None:
    """``leg`` with seats for ``passengers`` (same order) among its cabin's seats not in ``sold``; None: no room.

    The whole group is seated again by the policy's rules (one row when possible,
    window / aisle preferences, higher tiers first) rather than keeping the proposed
    seats still free, which could split a group that a free row would keep together.
    """
    if seat_maps is None:
        return None
    free = [s for s in seat_maps.seats(leg.flight_id, leg.cabin) if s.number not in sold]
    seats = choose_seats(free, passengers)
    return msgspec.structs.replace(leg, seats=seats) if seats is not None else None


def reseated(
    outcome: BookingChanged, updated: Booking, seated: list[Leg], taken: list[list[str]]
) -> tuple[BookingChanged, Booking]:
    """``outcome`` and ``updated`` with the new legs as actually ``seated`` (same order as
    ``outcome.new_legs``, ``taken``: the proposed seats of each found sold); the rationale says so."""
    if not any(taken) and all(leg.seats for leg in outcome.new_legs):  # seated as proposed
        return outcome, updated
    notes = "; ".join(
        f"{leg.number} {', '.join(sold)} taken, got {', '.join(leg.seats)}"
        if sold
        else f"{leg.number} seated at booking: {', '.join(leg.seats)}"
        for leg, proposed, sold in zip(seated, outcome.new_legs, taken, strict=True)
        if sold or not proposed.seats
    )
    legs = [seated[outcome.new_legs.index(leg)] if leg in outcome.new_legs else leg for leg in updated.legs]
    note = notes if not any(taken) else f"seats reassigned at booking: {notes}"
    rationale = f"{outcome.rationale}; {note}" if outcome.rationale else note
    return (
        msgspec.structs.replace(outcome, new_legs=seated, rationale=rationale),
        msgspec.structs.replace(updated, legs=legs),
    )


def no_room(leg: Leg, sold: list[str]) -> list[str]:
    """What :class:`SeatTaken` names for a leg without room: its proposed seats found sold
    (``flight/seat``), or its cabin (``flight/cabin``) when it proposed none."""
    return [f"{leg.flight_id}/{s}" for s in sold] or [f"{leg.flight_id}/{leg.cabin}"]


def seat_taken(decision: RebookPassenger, current: Booking | None, seats: list[str]) -> RebookRejected:
    """The rejection of ``decision`` because ``seats`` (``flight/seat``; ``flight/cabin`` for a leg that
    proposed no seats) are sold and no others fit the group."""
    detail = f"already sold, and no other seats for the whole group in the cabin: {', '.join(seats)}"
    return rejection(decision, "seat_taken", detail, current=current, taken_seats=seats)


def rejection(
    decision: RebookPassenger,
    reason: str,
    detail: str,
    *,
    current: Booking | None = None,
    taken_seats: list[str] | None = None,
) -> RebookRejected:
    """``decision`` rejected for ``reason`` (``seat_taken``, ``stale``, ``unknown_booking``, ``invalid``)."""
    return RebookRejected(
        decision_id=decision.decision_id,
        disruption=decision.disruption,
        booking_id=decision.booking_id,
        reason=reason,  # type: ignore[arg-type]
        passenger_ids=decision.passenger_ids,
        detail=detail,
        taken_seats=taken_seats or [],
        current=current,
        attempt=decision.attempt,
    )


def _reorder(leg: Leg, passenger_ids: list[str], order: dict[str, int]) -> Leg:
    if not leg.seats:  # none proposed: the store seats the group in the booking's order
        return leg
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
    SQLite's busy handler. Several stores on one file (replicas) take turns under an
    exclusive ``flock`` of ``<path>.lock``: a replica waiting for another's transaction
    wakes when it ends, where SQLite's busy handler would sleep 1 to 100 ms at a time.
    """

    def __init__(self, path: str | Path, *, seat_maps: SeatMaps | None = None) -> None:
        self.path = str(path)
        self.seat_maps = seat_maps
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
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
            # a checkpoint every 20,000 pages of WAL (80 MB) rather than 1,000: a storm's day of decisions
            # on the 200,000-passenger store takes about 10 % less CPU time, with one store on the file
            # or two taking turns (a memory map, tried too, cost two stores 15 % more)
            conn.execute("PRAGMA wal_autocheckpoint=20000")
            # a 16 MB page cache rather than 2: a batch of 150 to 200 decisions (what a storm's groups
            # bring together) dirties more pages than 2 MB hold, which SQLite then writes to the WAL
            # before the commit and reads back; the day's decisions, replayed in such batches by two
            # stores taking turns, read 37 % and write 26 % fewer pages and take 11 % less CPU time
            # (2.32 -> 2.06 CPU-s, the mean of 5 alternating pairs); batches of 33 take the same either way
            conn.execute("PRAGMA cache_size=-16000")
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """The store's turn to write, among every store on this file (on the store's own thread)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def load(self, bookings: Iterable[Booking]) -> None:
        await self._run(self._load, list(bookings))

    def _load(self, bookings: list[Booking]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM bookings")
            conn.execute("DELETE FROM decisions")
            conn.execute("DROP INDEX IF EXISTS seats_by_booking")  # an older store's: no longer kept
            conn.execute("DROP TABLE IF EXISTS seats")  # made again as SEATS_TABLE says (an older store's too)
            conn.execute(SEATS_TABLE)
            conn.executemany(
                "INSERT INTO bookings VALUES (?, ?, ?, ?)",
                ((b.booking_id, b.version, b.status, _encode(b).decode()) for b in bookings),
            )
            conn.executemany("INSERT INTO seats VALUES (?, ?, ?, ?)", seat_rows(bookings))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def apply(self, decision: RebookPassenger) -> Outcome:
        """Apply ``decision``; decisions arriving together share one transaction (group commit).

        Each decision keeps its own atomicity (a savepoint around its writes), and no outcome is
        returned before the transaction holding it committed.
        """
        result = (await self._settle([decision]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def apply_many(self, decisions: Sequence[RebookPassenger]) -> list[Outcome | Exception]:
        """Like :meth:`apply` for each, in one transaction with whatever else arrived meanwhile,
        without a task per decision. A subclass that overrides :meth:`apply` has each decision go
        through its ``apply``."""
        if type(self).apply is not SqliteStore.apply:
            return await super().apply_many(decisions)
        return await self._settle(decisions)

    async def _settle(self, decisions: Sequence[RebookPassenger]) -> list[Outcome | Exception]:
        """Queue ``decisions``; the first caller to get the turn applies everything queued by then."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = [loop.create_future() for _ in decisions]
        self._pending.extend(zip(decisions, futures, strict=True))
        async with self._batch:
            if futures and not futures[0].done():  # nobody took them into their batch (one takes all): lead one
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
        out: list[Outcome | Exception] = []
        for fut in futures:
            failed = fut.exception()
            if failed is None:
                out.append(fut.result())
            elif isinstance(failed, Exception):
                out.append(failed)
            else:
                raise failed
        return out

    def _apply_many(self, decisions: list[RebookPassenger]) -> list[Outcome | Exception]:
        conn = self._conn()
        results: list[Outcome | Exception] = []
        with self._writing():
            conn.execute("BEGIN IMMEDIATE")
            try:
                # what the batch reads, read for all its decisions at once (then kept current as they apply)
                outcomes: dict[str, str] = _by_key(
                    conn, "decision_id, outcome FROM decisions WHERE decision_id", {d.decision_id for d in decisions}
                )
                docs: dict[str, str | Booking] = dict(
                    _by_key(conn, "booking_id, doc FROM bookings WHERE booking_id", {d.booking_id for d in decisions})
                )
                for decision in decisions:
                    try:
                        results.append(self._apply_one(conn, decision, outcomes, docs))
                    except Exception as exc:  # this decision fails alone (its writes rolled back)
                        results.append(exc)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return results

    def _apply_one(
        self,
        conn: sqlite3.Connection,
        decision: RebookPassenger,
        outcomes: dict[str, str],
        docs: dict[str, str | Booking],
    ) -> Outcome:
        """Apply one decision of a batch: ``outcomes`` and ``docs`` hold the batch's recorded outcomes and
        bookings as the transaction has them (this decision's are added). Atomic: a decision that fails
        leaves nothing behind (a savepoint around its writes; one that writes nothing is one statement)."""
        recorded = outcomes.get(decision.decision_id)
        if recorded is not None:  # applied before: the same outcome again
            return decode_outcome(recorded)
        doc = docs.get(decision.booking_id)
        current = doc if isinstance(doc, Booking) or doc is None else _decode_booking(doc)
        outcome, updated = decide_outcome(decision, current)
        if updated is None:
            encoded = _record(conn, decision, outcome)
        else:
            # what a changed booking comes with (decide_outcome changes only a booking it found)
            assert isinstance(outcome, BookingChanged) and current is not None
            conn.execute("SAVEPOINT one")
            try:
                try:
                    outcome, updated = self._write(conn, decision, current, outcome, updated)
                    docs[decision.booking_id] = updated
                except SeatTaken as exc:
                    conn.execute("ROLLBACK TO one")
                    outcome = seat_taken(decision, current, exc.seats)
                encoded = _record(conn, decision, outcome)
            except BaseException:
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                if current is not None:
                    docs[decision.booking_id] = current  # as the rollback left it
                raise
            conn.execute("RELEASE one")
        outcomes[decision.decision_id] = encoded
        return outcome

    def _write(
        self,
        conn: sqlite3.Connection,
        decision: RebookPassenger,
        current: Booking,
        outcome: BookingChanged,
        updated: Booking,
    ) -> tuple[BookingChanged, Booking]:
        """Move the seats and store the booking; outcome and booking as seated. Raises :class:`SeatTaken`
        when a proposed seat is sold and its cabin has no room for the group (the caller rolls back)."""
        booking_id = updated.booking_id
        # the seats the booking gives up, as its document names them (each row found by its primary key)
        released = (
            current.legs
            if decision.action == "refund"
            else [leg for leg in current.legs if leg.flight_id in decision.replaces]
        )
        conn.executemany(
            "DELETE FROM seats WHERE flight_id = ? AND seat = ? AND booking_id = ?",
            ((leg.flight_id, seat, booking_id) for leg in released for seat in leg.seats),
        )
        if decision.action != "refund":
            seated: list[Leg] = []
            taken: list[list[str]] = []
            unseated: list[str] = []
            for leg in outcome.new_legs:
                sold: set[str] = set()
                if leg.seats:
                    marks = ", ".join("?" * len(leg.seats))
                    sold = {
                        r[0]
                        for r in conn.execute(
                            f"SELECT seat FROM seats WHERE flight_id = ? AND seat IN ({marks})",
                            (leg.flight_id, *leg.seats),
                        )
                    }
                taken.append([s for s in leg.seats if s in sold])
                if sold or not leg.seats:  # sold meanwhile, or none proposed: seat the group among what is free now
                    rows = conn.execute("SELECT seat FROM seats WHERE flight_id = ?", (leg.flight_id,)).fetchall()
                    given = reseat(leg, updated.passengers, {r[0] for r in rows}, self.seat_maps)
                    if given is None:
                        unseated += no_room(leg, taken[-1])
                        continue
                    leg = given
                seated.append(leg)
                conn.executemany(
                    "INSERT INTO seats VALUES (?, ?, ?, ?)",
                    (
                        (leg.flight_id, s, booking_id, p.passenger_id)
                        for p, s in zip(updated.passengers, leg.seats, strict=True)
                    ),
                )
            if unseated:
                raise SeatTaken(unseated)
            outcome, updated = reseated(outcome, updated, seated, taken)
        conn.execute(
            "UPDATE bookings SET version = ?, status = ?, doc = ? WHERE booking_id = ?",
            (updated.version, updated.status, _encode(updated).decode(), booking_id),
        )
        return outcome, updated

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


def _record(conn: sqlite3.Connection, decision: RebookPassenger, outcome: Outcome) -> str:
    """Record ``decision``'s outcome (what a redelivery of it gets again); the outcome as recorded."""
    encoded = encode_outcome(outcome)
    conn.execute("INSERT INTO decisions VALUES (?, ?, ?)", (decision.decision_id, decision.booking_id, encoded))
    return encoded


#: Keys of one ``IN (...)`` at most (SQLite allows 32,766 parameters since 3.32, 999 before).
_IN_CHUNK = 500


def _by_key(conn: sqlite3.Connection, select: str, keys: set[str]) -> dict[str, str]:
    """``SELECT <select> IN (keys)`` as a dict of the rows' first column to their second."""
    found: dict[str, str] = {}
    ordered = sorted(keys)
    for i in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[i : i + _IN_CHUNK]
        found.update(conn.execute(f"SELECT {select} IN ({', '.join('?' * len(chunk))})", chunk).fetchall())
    return found


def seat_rows(bookings: list[Booking]) -> Iterable[tuple[str, str, str, str]]:
    """Rows of the seats table (flight, seat, booking, passenger)."""
    for b in bookings:
        for leg in b.legs:
            for p, seat in zip(b.passengers, leg.seats, strict=True):
                yield (leg.flight_id, seat, b.booking_id, p.passenger_id)
