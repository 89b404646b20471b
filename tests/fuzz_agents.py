"""The two agents the hostile-input fuzz runs against, each as its own ``busagents run`` process.

``CoreLedger`` handles a core event, ``DurableLedger`` a durable command. Each records its
effect as a row in SQLite (``$FUZZ_DB``) keyed by the business id in the body, with no unique
constraint, so an effect applied twice shows as two rows, and returns an output that copies
the input's key and text: a long key makes a long output subject, a large text a large output.
The durable one applies its effect under :class:`~busagents.idempotency.Idempotency` keyed by
``ctx.message_id``, as a real durable handler does; its output is durable too.
"""

from __future__ import annotations

import os
import sqlite3

import msgspec

from busagents import Agent, Context, Durability, command, event, on
from busagents.idempotency import Idempotency

#: Short waits so that a message that trips the durable handler is settled in seconds.
ORDERS = Durability(stream="FUZZ_ORDERS", ack_wait=5.0, max_deliver=3, backoff=(0.1,), max_age=3600.0)
SHIPPED = Durability(stream="FUZZ_SHIPPED", max_age=3600.0)


@event("fuzz.core.work", key="key")
class Work(msgspec.Struct):
    id: str  # the business id: one ledger row per Work handled
    key: str
    text: str = ""


@event("fuzz.core.done", key="key")
class Done(msgspec.Struct):
    id: str
    key: str
    text: str


@command("fuzz.durable.order", key="key", durable=ORDERS)
class Order(msgspec.Struct):
    id: str
    key: str
    text: str = ""


@event("fuzz.durable.shipped", key="key", durable=SHIPPED)
class Shipped(msgspec.Struct):
    id: str
    key: str
    text: str


def open_ledger(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS effects (id TEXT NOT NULL, agent TEXT NOT NULL)")
    return db


def effect_counts(path: str) -> dict[str, int]:
    """Rows in the ledger per business id."""
    db = open_ledger(path)
    try:
        return {str(i): int(n) for i, n in db.execute("SELECT id, COUNT(*) FROM effects GROUP BY id")}
    finally:
        db.close()


class CoreLedger(Agent):
    """One ledger row per Work, then a Done copying its key and text."""

    name = "fuzz-core"
    produces = (Done,)
    max_concurrency = 8

    async def on_start(self, ctx: Context) -> None:
        self.db = open_ledger(os.environ["FUZZ_DB"])

    async def on_stop(self, ctx: Context) -> None:
        self.db.close()

    @on(Work)
    async def work(self, msg: Work, ctx: Context) -> Done:
        self.db.execute("INSERT INTO effects (id, agent) VALUES (?, ?)", (msg.id, self.name))
        return Done(id=msg.id, key=msg.key, text=msg.text)


class DurableLedger(Agent):
    """One ledger row per Order, at most once per message (idempotent), then a durable Shipped."""

    name = "fuzz-durable"
    produces = (Shipped,)
    max_concurrency = 8

    async def on_start(self, ctx: Context) -> None:
        self.db = open_ledger(os.environ["FUZZ_DB"])
        self.once = Idempotency(self.db)

    async def on_stop(self, ctx: Context) -> None:
        self.db.close()

    @on(Order)
    async def order(self, msg: Order, ctx: Context) -> Shipped:
        async with self.once(ctx.message_id) as first:
            if first:
                self.db.execute("INSERT INTO effects (id, agent) VALUES (?, ?)", (msg.id, self.name))
        return Shipped(id=msg.id, key=msg.key, text=msg.text)
