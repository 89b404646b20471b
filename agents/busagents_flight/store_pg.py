"""The booking store on PostgreSQL (psycopg 3), used when the store is a ``postgresql://`` DSN.

Same tables and the same rules as the SQLite store. Each apply is one transaction
that first locks the booking row (``SELECT ... FOR UPDATE``), so decisions about
one booking are serialised, and inserts each new leg's seats in one statement with
``ON CONFLICT DO NOTHING``, inside a savepoint. A seat another transaction sold
(even one that commits while we wait) undoes the savepoint, and the group is
seated again among the seats sold now (read committed: the next statement sees
that commit); only a cabin without room rolls the whole decision back as
``seat_taken``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterable

import msgspec
import psycopg
from busagents_travel import Booking, BookingChanged, Leg, RebookPassenger

from busagents import ConfigError

from .store import (
    SCHEMA,
    BookingStore,
    Outcome,
    SeatMaps,
    SeatTaken,
    decide_outcome,
    decode_outcome,
    encode_outcome,
    no_room,
    reseat,
    reseated,
    seat_rows,
    seat_taken,
)

__all__ = ["PostgresStore"]

log = logging.getLogger("busagents_flight.store")

_encode = msgspec.json.Encoder().encode
_decode_booking = msgspec.json.Decoder(Booking).decode
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_Connection = psycopg.AsyncConnection[tuple[object, ...]]
_SELL = """INSERT INTO seats (flight_id, seat, booking_id, passenger_id)
    SELECT %s, seat, %s, passenger_id FROM unnest(%s::text[], %s::text[]) AS t (seat, passenger_id) ORDER BY seat
    ON CONFLICT DO NOTHING RETURNING seat"""


class PostgresStore(BookingStore):
    """Bookings in PostgreSQL schema ``schema``, with up to ``connections`` concurrent transactions."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "busagents_flight",
        connections: int = 4,
        seat_maps: SeatMaps | None = None,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ConfigError(f"invalid PostgreSQL schema name {schema!r}: lower-case letters, digits and '_'")
        self.dsn = dsn
        self.schema = schema
        self.size = connections
        self.seat_maps = seat_maps
        self._idle: asyncio.Queue[_Connection] | None = None
        self._all: list[_Connection] = []

    async def open(self) -> None:
        if self._idle is not None:
            return
        self._idle = asyncio.Queue()
        try:
            for _ in range(self.size):
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
                self._all.append(conn)
                self._idle.put_nowait(conn)
        except psycopg.OperationalError as exc:
            await self.close()
            raise ConfigError(f"cannot connect to PostgreSQL at {_redact(self.dsn)}: {exc}") from None
        async with self._connection() as conn, conn.transaction():
            await self._create_schema(conn)
            for statement in SCHEMA:
                await conn.execute(statement.replace(" WITHOUT ROWID", ""))  # SQLite's; a heap table here

    async def _create_schema(self, conn: _Connection) -> None:
        """Create the schema unless it exists, and say so: it is a change to someone's database."""
        cursor = await conn.execute(
            "SELECT current_database(), EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", (self.schema,)
        )
        row = await cursor.fetchone()
        assert row is not None
        database, exists = row
        if exists:
            return
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        log.warning(
            "created schema %s in PostgreSQL database %s (%s) for the flight bookings; "
            "drop it with: DROP SCHEMA %s CASCADE",
            self.schema,
            database,
            _redact(self.dsn),
            self.schema,
        )

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._all = []
        self._idle = None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Connection]:
        if self._idle is None:
            await self.open()
        assert self._idle is not None
        conn = await self._idle.get()
        try:
            await conn.execute(f"SET search_path TO {self.schema}")
            yield conn
        finally:
            self._idle.put_nowait(conn)

    async def load(self, bookings: Iterable[Booking]) -> None:
        items = list(bookings)
        async with self._connection() as conn, conn.transaction():
            await conn.execute("TRUNCATE bookings, seats, decisions")
            async with conn.cursor().copy("COPY bookings (booking_id, version, status, doc) FROM STDIN") as copy:
                for b in items:
                    await copy.write_row((b.booking_id, b.version, b.status, _encode(b).decode()))
            async with conn.cursor().copy("COPY seats (flight_id, seat, booking_id, passenger_id) FROM STDIN") as copy:
                for row in seat_rows(items):
                    await copy.write_row(row)

    async def apply(self, decision: RebookPassenger) -> Outcome:
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    return await self._apply(conn, decision)
            except SeatTaken as exc:
                conflict = exc  # rolled back: record the rejection in a transaction of its own
            async with conn.transaction():
                row = await (
                    await conn.execute("SELECT doc FROM bookings WHERE booking_id = %s", (decision.booking_id,))
                ).fetchone()
                current = _decode_booking(str(row[0])) if row is not None else None
                return await self._record(conn, decision, seat_taken(decision, current, conflict.seats))

    async def _apply(self, conn: _Connection, decision: RebookPassenger) -> Outcome:
        cur = await conn.execute("SELECT doc FROM bookings WHERE booking_id = %s FOR UPDATE", (decision.booking_id,))
        row = await cur.fetchone()
        recorded = await (
            await conn.execute("SELECT outcome FROM decisions WHERE decision_id = %s", (decision.decision_id,))
        ).fetchone()
        if recorded is not None:  # applied before: the same outcome again
            return decode_outcome(str(recorded[0]))
        current = _decode_booking(str(row[0])) if row is not None else None
        outcome, updated = decide_outcome(decision, current)
        if updated is not None:
            assert isinstance(outcome, BookingChanged)  # what a changed booking comes with
            booking_id = updated.booking_id
            if decision.action == "refund":
                await conn.execute("DELETE FROM seats WHERE booking_id = %s", (booking_id,))
            else:
                async with conn.cursor() as c:
                    await c.executemany(
                        "DELETE FROM seats WHERE booking_id = %s AND flight_id = %s",
                        [(booking_id, f) for f in decision.replaces],
                    )
                seated: list[Leg] = []
                taken: list[list[str]] = []
                unseated: list[str] = []
                for leg in outcome.new_legs:
                    given, sold = await self._sell(conn, leg, updated)
                    taken.append(sold)
                    if given is None:
                        unseated += no_room(leg, sold)
                    else:
                        seated.append(given)
                if unseated:
                    raise SeatTaken(unseated)  # rolls the whole decision back
                outcome, updated = reseated(outcome, updated, seated, taken)
            await conn.execute(
                "UPDATE bookings SET version = %s, status = %s, doc = %s WHERE booking_id = %s",
                (updated.version, updated.status, _encode(updated).decode(), booking_id),
            )
        return await self._record(conn, decision, outcome)

    async def _sell(self, conn: _Connection, leg: Leg, booking: Booking) -> tuple[Leg | None, list[str]]:
        """Sell ``leg``'s seats to ``booking``'s passengers, seating them again while some are sold:
        (the leg as seated, None when the cabin has no room; the proposed seats found sold)."""
        pids = [p.passenger_id for p in booking.passengers]
        taken: list[str] = []
        unavailable: set[str] = set()
        seats = leg.seats
        if not seats:  # none proposed: seat the group among the seats free now
            cur = await conn.execute("SELECT seat FROM seats WHERE flight_id = %s", (leg.flight_id,))
            unavailable.update(str(r[0]) for r in await cur.fetchall())
            given = reseat(leg, booking.passengers, unavailable, self.seat_maps)
            if given is None:
                return None, taken
            seats = given.seats
        while True:
            async with conn.transaction() as attempt:  # a savepoint: a partly sold group is undone
                cur = await conn.execute(_SELL, (leg.flight_id, booking.booking_id, seats, pids))
                got = {str(r[0]) for r in await cur.fetchall()}
                missed = [s for s in seats if s not in got]
                if missed:
                    raise psycopg.Rollback(attempt)
            if not missed:
                return msgspec.structs.replace(leg, seats=seats), taken
            if leg.seats:  # the first attempt's: the decision's own seats (none for a leg that proposed none)
                taken = taken or missed
            cur = await conn.execute("SELECT seat FROM seats WHERE flight_id = %s", (leg.flight_id,))
            unavailable.update(missed, (str(r[0]) for r in await cur.fetchall()))  # grows every round: ends
            given = reseat(leg, booking.passengers, unavailable, self.seat_maps)
            if given is None:
                return None, taken
            seats = given.seats

    async def _record(self, conn: _Connection, decision: RebookPassenger, outcome: Outcome) -> Outcome:
        cur = await conn.execute(
            "INSERT INTO decisions VALUES (%s, %s, %s) ON CONFLICT (decision_id) DO NOTHING RETURNING decision_id",
            (decision.decision_id, decision.booking_id, encode_outcome(outcome)),
        )
        if await cur.fetchone() is None:  # a concurrent replay recorded it first: theirs stands
            row = await (
                await conn.execute("SELECT outcome FROM decisions WHERE decision_id = %s", (decision.decision_id,))
            ).fetchone()
            if row is not None:
                return decode_outcome(str(row[0]))
        return outcome

    async def booking(self, booking_id: str) -> Booking | None:
        async with self._connection() as conn:
            row = await (await conn.execute("SELECT doc FROM bookings WHERE booking_id = %s", (booking_id,))).fetchone()
        return _decode_booking(str(row[0])) if row is not None else None

    async def is_empty(self) -> bool:
        async with self._connection() as conn:
            return await (await conn.execute("SELECT 1 FROM bookings LIMIT 1")).fetchone() is None

    async def documents(self) -> list[str]:
        async with self._connection() as conn:
            rows = await (await conn.execute("SELECT doc FROM bookings ORDER BY booking_id")).fetchall()
        return [str(r[0]) for r in rows]

    async def drop(self) -> None:
        """Remove the schema and everything in it (tests)."""
        async with self._connection() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def _redact(dsn: str) -> str:
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", dsn)
