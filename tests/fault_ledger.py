"""A minimal agent with a side effect, for the fault tests: each durable Credit adds one row to SQLite.

The ``credits`` table has no unique constraint on purpose: a repeated effect would show up
as a second row, so the tests count effects in the store, not in logs.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors

from busagents import Agent, Bus, Context, Durability, command, event, on
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
    crash: bool = False  # the handler kills its own process (a segfault in a native library, say)


@event("faults.credited", key="account", durable=Durability(ack_wait=2.0))
class Credited(msgspec.Struct):
    account: str
    n: int


def open_store(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS credits (n INTEGER NOT NULL, account TEXT NOT NULL, by TEXT NOT NULL)")
    # redeliveries the idempotency helper turned away, and attempts at slow credits: evidence, not effects
    db.execute("CREATE TABLE IF NOT EXISTS skipped (n INTEGER NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS attempts (n INTEGER NOT NULL, by TEXT NOT NULL)")
    return db


def count_rows(path: str, table: str) -> int:
    db = open_store(path)
    try:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


def count_effects(path: str) -> tuple[int, int]:
    """(rows, distinct n) in the store."""
    db = open_store(path)
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
        if cmd.crash:
            os._exit(3)
        if cmd.slow:
            self.db.execute("INSERT INTO attempts (n, by) VALUES (?, ?)", (cmd.n, self.replica))
            await asyncio.sleep(cmd.slow)  # a long LLM call, say
        with self.once(ctx.message_id) as first:
            if first:
                self.db.execute(
                    "INSERT INTO credits (n, account, by) VALUES (?, ?, ?)", (cmd.n, cmd.account, self.replica)
                )
            else:
                self.db.execute("INSERT INTO skipped (n) VALUES (?)", (cmd.n,))
        return Credited(account=cmd.account, n=cmd.n)


# Test helpers shared by tests/test_faults_*.py


def spawn_ledger(url: str, db_path: str, *, replica: str = "r1", **env: str) -> subprocess.Popen[bytes]:
    """The Ledger agent as its own OS process (``busagents run fault_ledger:Ledger``)."""
    here = Path(__file__).parent
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
        "FAULTS_DB": db_path,
        "FAULTS_REPLICA": replica,
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0",
        **env,
    }
    cmd = [sys.executable, "-m", "busagents", "--log-level", "ERROR", "run", "fault_ledger:Ledger", "--nats", url]
    return subprocess.Popen(cmd, env=full_env, cwd=here.parent, stdin=subprocess.DEVNULL)


async def publish_credits(bus: Bus, numbers: Iterable[int], *, concurrency: int = 128, **fields: Any) -> None:
    """Publish one durable Credit per number, ``concurrency`` in flight (each waits for its stream ack)."""
    it = iter(numbers)

    async def sender() -> None:
        for n in it:
            await bus.publish(Credit(account=f"acct-{n % 97}", n=n, **fields))

    await asyncio.gather(*(sender() for _ in range(concurrency)))


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (cheap: a store count) until true; fail with ``what`` after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_settled(bus: Bus, stream: str, consumer: str, timeout: float) -> None:
    """Wait until the consumer has nothing pending nor unacknowledged: no effect can still come."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            info = await bus.js.consumer_info(stream, consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0:
                return
        except (nats.errors.Error, nats.js.errors.Error):
            pass  # a leader election in progress
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"consumer {stream}/{consumer} not settled within {timeout}s")
        await asyncio.sleep(0.1)


async def stream_count(bus: Bus, stream: str) -> int:
    info = await bus.js.stream_info(stream)
    return int(info.state.messages)
