"""Exactly-once effects on at-least-once delivery: remember handled message ids with the effect.

Durable delivery may hand a handler the same message twice (a crash after the effect but
before the ack, a redelivery after ``ack_wait``). A handler with side effects makes them
idempotent by recording the message id *in the same transaction* as the effect::

    class Rebooker(Agent):
        async def on_start(self, ctx):
            self.db = sqlite3.connect("bookings.db", isolation_level=None)
            self.once = Idempotency(self.db)

        @on(RebookPassenger)
        async def rebook(self, cmd, ctx):
            with self.once(ctx.message_id) as first:
                if first:
                    self.db.execute("UPDATE bookings SET flight = ? WHERE id = ?", ...)
            return BookingChanged(...)  # same output either way: its id is derived, copies are dropped

If the transaction commits, the id is recorded and the effect happened, together; if it
fails or the process dies, neither did, and the redelivery does it. A second delivery finds
the id and skips the effect. The key is ``ctx.message_id``: the message's id bound to a digest
of its bytes, kept across redeliveries and across ``busagents dlq replay`` of the same bytes
(``Ba-Replay-Of``), never shared by two different messages.

The store must be the one the effect writes to (here SQLite, any DB-API store with
transactions works the same way); a marker kept elsewhere (say a JetStream KV bucket)
cannot commit atomically with the effect and would only narrow the window, not close it.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ConfigError

__all__ = ["Idempotency"]

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Idempotency:
    """Message ids already handled, kept in a table of the store the effects go to (SQLite).

    ``with once(message_id) as first:`` opens a write transaction (``BEGIN IMMEDIATE``, so
    concurrent replicas on one database file serialise), records the id and yields True
    the first time, False when it was already recorded; it commits when the block ends
    normally and rolls back (effect and id together) when it raises.
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

    @contextmanager
    def __call__(self, message_id: str | None) -> Iterator[bool]:
        if not message_id:
            raise ConfigError("an idempotent effect needs the message id (ctx.message_id); got none")
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = db.execute(self._insert, (message_id, time.time())).rowcount == 1
            yield first
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def seen(self, message_id: str) -> bool:
        """True when ``message_id`` was handled (its effect committed)."""
        row = self.db.execute(f"SELECT 1 FROM {self.table} WHERE message_id = ?", (message_id,)).fetchone()
        return row is not None

    def forget_before(self, timestamp: float) -> int:
        """Drop ids handled before ``timestamp`` (older than any possible redelivery); returns how many."""
        cur = self.db.execute(f"DELETE FROM {self.table} WHERE handled_at < ?", (timestamp,))
        return cur.rowcount
