"""Fault: a poison message (its handler always raises) among 10,000 good ones.

One booking's row in the rebooker's store is corrupt, so applying its decision raises every
time. The decision is redelivered with backoff until ``max_deliver`` (3 here), then stored
in the dead-letter stream with its reason and terminated, while the 9,999 others flow.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from busagents_flight.rebooker import Rebooker
from busagents_flight.store import SqliteStore

from busagents import Bus, NatsServer, Worker
from busagents.dlq import DeadLetter, dead_letters

from .fault_flight import CONSUMER, STREAM, count_changes, day, decisions, load_store, publish_decisions
from .fault_ledger import Credit, count_effects, publish_credits, spawn_ledger, wait_for, wait_settled

N = 10_000
MAX_DELIVER = 3


async def test_poison_message_is_dead_lettered_after_max_deliveries_while_the_rest_flows(tmp_path: Path) -> None:
    store = str(tmp_path / "bookings.sqlite3")
    batch = decisions(N)
    await load_store(store)
    poison = batch[N // 3]
    db = sqlite3.connect(store)
    db.execute("UPDATE bookings SET doc = '{\"corrupt' WHERE booking_id = ?", (poison.booking_id,))
    db.commit()
    db.close()
    started = time.perf_counter()
    with NatsServer() as server:
        bus = await Bus.connect(server.url, max_deliver=MAX_DELIVER, backoff=(0.05, 0.1))
        rebooker = Rebooker(SqliteStore(store), day())
        worker = Worker([rebooker], bus)
        await worker.start()
        try:
            await publish_decisions(bus, batch)
            await wait_for(lambda: count_changes(store)[2] >= N - 1, 60, f"{N - 1} decisions applied")
            await wait_settled(bus, STREAM, CONSUMER, 30)
            letters = await dead_letters(bus, agent=CONSUMER)
            once, more, recorded = count_changes(store)
        finally:
            await worker.drain()
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\npoison: {N} RebookPassenger, {elapsed:.1f}s; bookings changed once={once}, more than once={more}, "
        f"decisions recorded={recorded}; dead letters={[(d.stage, d.deliveries, d.reason) for d in letters]}"
    )
    assert once == N - 1 and more == 0 and recorded == N - 1, "good decisions were lost or applied twice"
    assert len(letters) == 1, f"expected the poison decision alone in the DLQ, got {len(letters)}"
    (letter,) = letters
    assert letter.stage == "max-deliveries"
    assert letter.deliveries == MAX_DELIVER
    assert "DecodeError" in letter.reason
    assert letter.subject == f"travel.booking.rebook.{poison.booking_id}"
    assert poison.decision_id.encode() in letter.data  # the original bytes
    assert worker.stats[CONSUMER].dead_lettered == 1


async def test_poison_message_that_kills_its_process_each_time_is_dead_lettered_from_the_advisory(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    # JetStream sends the max-deliveries advisory one ack wait after the last delivery, on core NATS:
    # the restarted process must be subscribed by then (it took 2 to 3 s to start on a slow 2-core
    # machine, where an ack wait of 1 s lost the advisory).
    env = {"BUSAGENTS_ACK_WAIT": "6", "BUSAGENTS_MAX_DELIVER": "2"}
    with NatsServer() as server:
        bus = await Bus.connect(server.url)
        agents = [spawn_ledger(server.url, db, **env)]
        try:
            await publish_credits(bus, range(N))
            await wait_for(lambda: count_effects(db)[1] >= N, 60, f"{N} effects")
            await bus.publish(Credit(account="acct-crash", n=N, crash=True))
            deadline = asyncio.get_running_loop().time() + 60
            letters: list[DeadLetter] = []
            while not letters:  # a supervisor: restart the agent each time the poison kills it
                assert asyncio.get_running_loop().time() < deadline, "the poison was never dead-lettered"
                if agents[-1].poll() is not None:
                    agents.append(spawn_ledger(server.url, db, **env))
                letters = await dead_letters(bus, agent="ledger")
                await asyncio.sleep(0.05)
            rows, distinct = count_effects(db)
        finally:
            agents[-1].terminate()
            await asyncio.to_thread(agents[-1].wait, 10)
            await bus.close()
    elapsed = time.perf_counter() - started
    crashes = sum(1 for a in agents if a.returncode == 3)
    print(
        f"\npoison (crash): {N} messages then one that kills its process, {elapsed:.1f}s; "
        f"store rows={rows} distinct={distinct}; process deaths={crashes}; "
        f"dead letters={[(d.stage, d.deliveries, d.reason) for d in letters]}"
    )
    assert rows == distinct == N
    assert crashes == 2  # max_deliver deliveries, then JetStream stops and says so
    (letter,) = letters
    assert letter.stage == "max-deliveries" and letter.deliveries == 2
    assert "never settled" in letter.reason
    assert letter.subject == "faults.credit.acct-crash"
