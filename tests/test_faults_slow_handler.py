"""Fault: a handler runs far longer than the ack wait (an LLM call, a slow booking system).

Two rebooker replicas share the durable consumer with a 2 s ack wait, and the booking system
takes 5 s for one decision. The replica working on it keeps it with in-progress acks, so
it is applied once, by one replica, while the two replicas share the 10,000 others.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents_flight.rebooker import Rebooker
from busagents_flight.store import Outcome, SqliteStore
from busagents_travel import RebookPassenger

from busagents import Bus, NatsServer, Worker

from .fault_flight import CONSUMER, STREAM, count_changes, day, decisions, load_store, publish_decisions
from .fault_ledger import wait_for, wait_settled

N = 10_000
ACK_WAIT = 2.0
SLOW_SECONDS = 5.0


class SlowStore(SqliteStore):
    """The booking store, slow for one booking; records which replica tried that booking."""

    def __init__(self, path: str, replica: str, slow_booking: str, attempts: list[str]) -> None:
        super().__init__(path)
        self.replica = replica
        self.slow_booking = slow_booking
        self.attempts = attempts

    async def apply(self, decision: RebookPassenger) -> Outcome:
        if decision.booking_id == self.slow_booking:
            self.attempts.append(self.replica)
            await asyncio.sleep(SLOW_SECONDS)
        return await super().apply(decision)


async def test_slow_handler_keeps_its_message_with_in_progress_acks_and_no_other_replica_gets_it(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "bookings.sqlite3")
    batch = decisions(N + 1)
    slow = batch[-1]
    await load_store(store)
    attempts: list[str] = []
    started = time.perf_counter()
    with NatsServer() as server:
        buses = [await Bus.connect(server.url, ack_wait=ACK_WAIT) for _ in range(2)]
        rebookers = [Rebooker(SlowStore(store, f"r{i}", slow.booking_id, attempts), day()) for i in range(2)]
        workers = [Worker([r], bus) for r, bus in zip(rebookers, buses, strict=True)]
        for worker in workers:
            await worker.start()
        try:
            await buses[0].publish(slow)  # first, so it runs while the others flow
            await publish_decisions(buses[0], batch[:N])
            await wait_for(lambda: count_changes(store)[2] >= N + 1, 60, f"{N + 1} decisions applied")
            await wait_settled(buses[0], STREAM, CONSUMER, 30)
            once, more, recorded = count_changes(store)
        finally:
            for worker in workers:
                await worker.drain()
            for bus in buses:
                await bus.close()
    elapsed = time.perf_counter() - started
    shares = [r.applied + r.rejected for r in rebookers]
    print(
        f"\nslow_handler: {N + 1} RebookPassenger, {elapsed:.1f}s; bookings changed once={once}, "
        f"more than once={more}, decisions recorded={recorded}; slow decision tried by {attempts}; "
        f"decisions per replica={shares}"
    )
    assert elapsed > SLOW_SECONDS  # the slow handler really outlived several ack waits
    assert len(attempts) == 1, f"the slow decision was delivered {len(attempts)} times: {attempts}"
    assert once == N + 1 and more == 0 and recorded == N + 1, "decisions were lost or applied twice"
    assert min(shares) > 0, f"the replicas did not share the load: {shares}"
