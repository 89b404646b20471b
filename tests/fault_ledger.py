"""A minimal agent with a side effect, for the fault tests: each durable Credit adds one row to SQLite.

The ``credits`` table has no unique constraint on purpose: a repeated effect would show up
as a second row, so the tests count effects in the store, not in logs.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import msgspec

from busagents import Agent, Context, Durability, PermanentError, command, event, on
from busagents.idempotency import Idempotency

#: Short ack wait and backoff so the fault tests recover in seconds, not the default 30.
FAST = Durability(ack_wait=2.0, max_deliver=3, backoff=(0.05, 0.1), batch=128)


@command("faults.credit", key="account", durable=FAST)
class Credit(msgspec.Struct):
    account: str
    n: int
    amount: int = 1
    poison: bool = False
    slow: float = 0.0


@event("faults.credited", key="account", durable=Durability(ack_wait=2.0))
class Credited(msgspec.Struct):
    account: str
    n: int


def open_store(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS credits (n INTEGER NOT NULL, account TEXT NOT NULL, by TEXT NOT NULL)")
    return db


def count_effects(path: str) -> tuple[int, int]:
    """(rows, distinct n) in the store."""
    db = sqlite3.connect(path)
    try:
        rows, distinct = db.execute("SELECT COUNT(*), COUNT(DISTINCT n) FROM credits").fetchone()
        return int(rows), int(distinct)
    finally:
        db.close()


class Ledger(Agent):
    """Applies each Credit once to the SQLite store named by $FAULTS_DB."""

    name = "ledger"
    produces = (Credited,)
    max_concurrency = 16

    def __init__(self, db_path: str | None = None) -> None:
        self.db_path = db_path or os.environ["FAULTS_DB"]
        self.replica = os.environ.get("FAULTS_REPLICA", str(os.getpid()))

    async def on_start(self, ctx: Context) -> None:
        self.db = open_store(self.db_path)
        self.once = Idempotency(self.db)

    async def on_stop(self, ctx: Context) -> None:
        self.db.close()

    @on(Credit)
    async def credit(self, cmd: Credit, ctx: Context) -> Credited:
        if cmd.poison:
            raise RuntimeError(f"poison credit {cmd.n}")
        if cmd.slow:
            await asyncio.sleep(cmd.slow)  # a long LLM call, say
        with self.once(ctx.message_id) as first:
            if first:
                self.db.execute(
                    "INSERT INTO credits (n, account, by) VALUES (?, ?, ?)", (cmd.n, cmd.account, self.replica)
                )
        return Credited(account=cmd.account, n=cmd.n)
