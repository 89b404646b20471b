"""Fault: a handler runs far longer than the ack wait (an LLM call that takes a minute).

Two replicas share the durable consumer, the ack wait is 1 s and one credit takes 3.5 s.
The replica working on it keeps it with in-progress acks, so it is handled once, by one
replica, while the two replicas share the 10,000 others.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from busagents import Bus, NatsServer, Worker

from .fault_ledger import Credit, Ledger, count_effects, publish_credits, wait_for, wait_settled

N = 10_000
SLOW = N  # the number of the slow credit
ACK_WAIT = 1.0
SLOW_SECONDS = 3.5


class Replica(Ledger):
    name = "ledger"

    def __init__(self, db_path: str, replica: str) -> None:
        super().__init__(db_path)
        self.replica = replica


async def test_slow_handler_keeps_its_message_with_in_progress_acks_and_no_other_replica_gets_it(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    with NatsServer() as server:
        buses = [await Bus.connect(server.url, ack_wait=ACK_WAIT) for _ in range(2)]
        workers = [Worker([Replica(db, f"r{i}")], bus) for i, bus in enumerate(buses)]
        for worker in workers:
            await worker.start()
        try:
            await buses[0].publish(Credit(account="acct-slow", n=SLOW, slow=SLOW_SECONDS))
            await publish_credits(buses[0], range(N))
            await wait_for(lambda: count_effects(db)[1] >= N + 1, 60, f"{N + 1} distinct effects")
            await wait_settled(buses[0], "BA_Credit", "ledger", 30)
            rows, distinct = count_effects(db)
            store = sqlite3.connect(db)
            attempts = store.execute("SELECT by FROM attempts WHERE n = ?", (SLOW,)).fetchall()
            shares = dict(store.execute("SELECT by, COUNT(*) FROM credits GROUP BY by").fetchall())
            store.close()
        finally:
            for worker in workers:
                await worker.drain()
            for bus in buses:
                await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\nslow_handler: {N + 1} messages, {elapsed:.1f}s; store rows={rows} distinct={distinct}; "
        f"slow credit attempts={attempts}; shares per replica={shares}"
    )
    assert elapsed > SLOW_SECONDS  # the slow handler really outlived several ack waits
    assert attempts and len(attempts) == 1, f"the slow message was delivered {len(attempts)} times: {attempts}"
    assert distinct == N + 1 and rows == N + 1, "messages were lost or applied twice"
    assert len(shares) == 2 and min(shares.values()) > 0, f"the replicas did not share the load: {shares}"
