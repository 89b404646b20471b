"""Exactly-once effects on at-least-once delivery: remember handled message ids with the effect.

Durable delivery may hand a handler the same message twice (a crash after the effect but
before the ack, a redelivery after ``ack_wait``). A handler with side effects makes them
idempotent by recording the message id *in the same transaction* as the effect::

    class Rebooker(Agent):
        async def on_start(self, ctx):
            self.db = sqlite3.connect("bookings.db", isolation_level=None, check_same_thread=False)
            self.once = Idempotency(self.db)

        @on(RebookPassenger)
        async def rebook(self, cmd, ctx):
            async with self.once(ctx.message_id) as first:
                if first:
                    self.db.execute("UPDATE bookings SET flight = ? WHERE id = ?", ...)
            return BookingChanged(...)  # same output either way: its id is derived, copies are dropped

If the transaction commits, the id is recorded and the effect happened, together; if it
fails or the process dies, neither did, and the redelivery does it. A second delivery finds
the id and skips the effect. The key is ``ctx.message_id``: the message's id bound to a digest
of its bytes, kept across redeliveries and across ``busagents dlq replay`` of the same bytes
(``Ba-Replay-Of``), never shared by two different messages.

``async with`` is the form for handlers: opening the write transaction waits for other
writers to the file (up to the connection's busy timeout, 5 s by default), and it waits in a
worker thread, so the event loop keeps serving the other messages and their in-progress
acks meanwhile; the blocks of one helper run one at a time. The connection is then used
from more than one thread: open it with ``check_same_thread=False``. Plain ``with`` does the
same on the calling thread: for scripts and threads, not for the event loop (it blocks it).

The store must be the one the effect writes to (here SQLite, any DB-API store with
transactions works the same way); a marker kept elsewhere (say a JetStream KV bucket)
cannot commit atomically with the effect and would only narrow the window, not close it.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from .errors import ConfigError

T = TypeVar("T")

__all__ = ["Idempotency"]

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Idempotency:
    """Message ids already handled, kept in a table of the store the effects go to (SQLite).

    ``async with once(message_id) as first:`` (or ``with``, off the event loop) opens a
    write transaction (``BEGIN IMMEDIATE``, so concurrent replicas on one database file
    serialise), records the id and gives True the first time, False when it was already
    recorded; it commits when the block ends normally and rolls back (effect and id
    together) when it raises.
    """

    def __init__(self, db: sqlite3.Connection, *, table: str = "busagents_handled") -> None:
        if not _TABLE.match(table):
            raise ConfigError(f"idempotency table name {table!r} must be a plain SQL identifier")
        if db.isolation_level is not None:
            raise ConfigError(
                "Idempotency needs a connection in autocommit mode (sqlite3.connect(..., isolation_level=None)) "
                "so that it controls the transaction that holds the effect and the message id"
            )
        self.db = db
        self.table = table
        db.execute(f"CREATE TABLE IF NOT EXISTS {table} (message_id TEXT PRIMARY KEY, handled_at REAL NOT NULL)")
        self._insert = f"INSERT OR IGNORE INTO {table} (message_id, handled_at) VALUES (?, ?)"
        self._turn = asyncio.Lock()  # one async block at a time on the connection

    def __call__(self, message_id: str | None) -> _Once:
        if not message_id:
            raise ConfigError("an idempotent effect needs the message id (ctx.message_id); got none")
        return _Once(self, message_id)

    def _begin(self, message_id: str) -> bool:
        """Open the write transaction and record the id; True when it was not recorded yet."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            return bool(db.execute(self._insert, (message_id, time.time())).rowcount == 1)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _end(self, commit: bool) -> None:
        db = self.db
        if commit:
            try:
                db.execute("COMMIT")
                return
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if db.in_transaction:
            db.execute("ROLLBACK")

    def seen(self, message_id: str) -> bool:
        """True when ``message_id`` was handled (its effect committed)."""
        row = self.db.execute(f"SELECT 1 FROM {self.table} WHERE message_id = ?", (message_id,)).fetchone()
        return row is not None

    def forget_before(self, timestamp: float) -> int:
        """Drop ids handled before ``timestamp`` (older than any possible redelivery); returns how many."""
        cur = self.db.execute(f"DELETE FROM {self.table} WHERE handled_at < ?", (timestamp,))
        return cur.rowcount


class _Once:
    """One idempotent effect: ``with`` on the calling thread, ``async with`` in a worker thread."""

    __slots__ = ("_message_id", "_once")

    def __init__(self, once: Idempotency, message_id: str) -> None:
        self._once = once
        self._message_id = message_id

    def __enter__(self) -> bool:
        return self._once._begin(self._message_id)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._once._end(commit=exc_type is None)

    async def __aenter__(self) -> bool:
        once = self._once
        await once._turn.acquire()
        try:
            begun = _in_thread(once._begin, self._message_id)
            if await _finished(begun):  # cancelled meanwhile: undo what the thread did, then stop
                if begun.exception() is None:
                    await _finished(_in_thread(once._end, False))
                raise asyncio.CancelledError
            try:
                return begun.result()
            except sqlite3.ProgrammingError as exc:
                if "same thread" not in str(exc):
                    raise
                raise ConfigError(
                    "async with Idempotency(db)(...) runs SQLite in a worker thread: "
                    "open the connection with sqlite3.connect(..., check_same_thread=False)"
                ) from None
        except BaseException:
            once._turn.release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        once = self._once
        try:
            ended = _in_thread(once._end, exc_type is None)
            if await _finished(ended):
                raise asyncio.CancelledError  # after the commit or rollback, which the thread finished
            ended.result()
        finally:
            once._turn.release()


def _in_thread(func: Callable[..., T], *args: object) -> asyncio.Future[T]:
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


async def _finished(work: asyncio.Future[T]) -> bool:
    """Wait until ``work`` (a thread's) is done, even through a cancel; True when cancelled meanwhile.

    A thread cannot be stopped half-way: returning earlier would let the next block use the
    connection while this one still does.
    """
    cancelled = False
    while not work.done():
        try:
            await asyncio.wait([work])
        except asyncio.CancelledError:
            cancelled = True
    return cancelled
