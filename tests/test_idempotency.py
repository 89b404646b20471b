"""The idempotency helper: the effect and its message id commit together, off the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import msgspec
import pytest

from busagents import Agent, Bus, Context, command, on
from busagents.errors import ConfigError
from busagents.idempotency import Idempotency
from busagents.server import NatsServer
from busagents.testing import delete_streams, run_agents


def store(path: Path | str = ":memory:") -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER)")
    return db


def effects(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM effects").fetchone()[0])


async def test_async_form_records_the_id_with_the_effect_and_rolls_both_back_together() -> None:
    db = store()
    once = Idempotency(db)
    with pytest.raises(RuntimeError):
        async with once("m1") as first:
            assert first
            db.execute("INSERT INTO effects VALUES (1)")
            raise RuntimeError("crash after the effect, before the commit")
    assert not once.seen("m1") and effects(db) == 0
    for _ in range(3):  # the redeliveries
        async with once("m1") as first:
            if first:
                db.execute("INSERT INTO effects VALUES (1)")
    assert once.seen("m1") and effects(db) == 1


async def test_async_blocks_on_one_connection_take_turns() -> None:
    db = store()
    once = Idempotency(db)
    inside = asyncio.Event()
    go_on = asyncio.Event()

    async def effect(message_id: str) -> None:
        async with once(message_id) as first:
            assert first
            db.execute("INSERT INTO effects VALUES (1)")
            inside.set()
            await go_on.wait()  # the other block must not open a transaction on this connection now

    first = asyncio.create_task(effect("a"))
    await asyncio.wait_for(inside.wait(), 5)
    second = asyncio.create_task(effect("b"))
    go_on.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert once.seen("a") and once.seen("b") and effects(db) == 2


async def test_async_form_on_a_connection_bound_to_its_thread_says_what_to_do() -> None:
    once = Idempotency(sqlite3.connect(":memory:", isolation_level=None))
    with pytest.raises(ConfigError, match="check_same_thread=False"):
        async with once("m1"):
            pass
    async with asyncio.timeout(1):  # the failed block gave its turn back
        await once._turn.acquire()


ACK_WAIT = 1.0


@command("test.idempotency.entry", durable=True)
class Entry(msgspec.Struct):
    n: int
    slow: bool = False


class Ledger(Agent):
    """One lane waits on a long call (in-progress acks keep its message), one writes to the store."""

    name = "idempotent-ledger"
    max_concurrency = 2

    def __init__(self, path: Path) -> None:
        self.path = path
        self.slow_calls = 0
        self.slow_started = asyncio.Event()
        self.slow_done = asyncio.Event()
        self.storing = asyncio.Event()
        self.stored = asyncio.Event()

    async def on_start(self, ctx: Context) -> None:
        self.db = store(self.path)
        self.once = Idempotency(self.db)

    async def on_stop(self, ctx: Context) -> None:
        self.db.close()

    @on(Entry)
    async def enter(self, entry: Entry, ctx: Context) -> None:
        if entry.slow:
            self.slow_calls += 1
            self.slow_started.set()
            await asyncio.sleep(3 * ACK_WAIT)  # a long LLM call, say
            self.slow_done.set()
            return
        self.storing.set()
        async with self.once(ctx.message_id) as first:  # waits for the file's write lock
            if first:
                self.db.execute("INSERT INTO effects VALUES (?)", (entry.n,))
        self.stored.set()


async def test_a_handler_waiting_for_the_store_does_not_stop_in_progress_acks_of_the_others(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    Idempotency(store(path)).db.close()  # the tables exist before another writer holds the file
    locked, release = threading.Event(), threading.Event()

    def other_writer() -> None:  # holds the file's write lock, as another replica's long transaction would
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(timeout=6 * ACK_WAIT)
        db.execute("ROLLBACK")
        db.close()

    writer = threading.Thread(target=other_writer)
    writer.start()
    bus = await Bus.connect(nats_server.url, ack_wait=ACK_WAIT)
    ledger = Ledger(path)
    try:
        assert await asyncio.to_thread(locked.wait, 5)
        async with run_agents(bus, ledger):
            await bus.publish(Entry(n=1, slow=True))
            await asyncio.wait_for(ledger.slow_started.wait(), 5)
            await bus.publish(Entry(n=2))
            await asyncio.wait_for(ledger.storing.wait(), 5)
            await asyncio.wait_for(ledger.slow_done.wait(), 10)  # three ack waits while the store waited
            release.set()
            await asyncio.wait_for(ledger.stored.wait(), 10)
        info = await bus.js.consumer_info("BA_Entry", "idempotent-ledger")
    finally:
        release.set()
        await asyncio.to_thread(writer.join)
        await delete_streams(bus)
        await bus.close()
    assert ledger.slow_calls == 1
    assert info.delivered.consumer_seq == 2  # two messages, two deliveries: nothing was redelivered
    assert effects(store(path)) == 1
