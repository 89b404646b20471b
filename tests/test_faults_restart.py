"""Fault: the nats-server is restarted mid-stream, with the same store directory.

10,000 durable RebookPassenger decisions; the rebooker runs as its own OS process. The
server is stopped and started again on the same port while decisions are being published
and applied. Publishers retry with the same message id; the consumer asks again once the
server is back; every booking changes exactly once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents import Bus, NatsServer

from .fault_flight import (
    CONSUMER,
    STREAM,
    count_changes,
    decisions,
    load_store,
    publish_decisions,
    seat_conflicts,
    spawn_rebooker,
)
from .fault_ledger import stream_count, wait_for, wait_settled

N = 10_000


async def test_nats_server_restart_mid_stream_loses_and_repeats_no_booking_change(tmp_path: Path) -> None:
    store = str(tmp_path / "bookings.sqlite3")
    batch = decisions(N)
    await load_store(store)
    started = time.perf_counter()
    server = NatsServer(store_dir=tmp_path / "nats").start()
    bus = await Bus.connect(server.url)
    agent = spawn_rebooker(server.url, store, BUSAGENTS_ACK_WAIT="2")
    try:
        await publish_decisions(bus, batch[: N // 2])
        await wait_for(lambda: count_changes(store)[0] >= N // 5, 60, "the first booking changes")
        restart = asyncio.create_task(asyncio.to_thread(server.restart))
        restarted_at = count_changes(store)[0]
        assert restarted_at < N // 2, "the rebooker was done before the restart: nothing was tested"
        await publish_decisions(bus, batch[N // 2 :])  # during the outage: retried with their ids
        await restart
        await wait_for(lambda: count_changes(store)[2] >= N, 90, f"{N} decisions applied")
        await wait_settled(bus, STREAM, CONSUMER, 30)
        once, more, recorded = count_changes(store)
        conflicts = await seat_conflicts(store)
        stored = await stream_count(bus, STREAM)
    finally:
        agent.terminate()
        await asyncio.to_thread(agent.wait, 10)
        await bus.close()
        server.stop()
    elapsed = time.perf_counter() - started
    print(
        f"\nrestart: {N} RebookPassenger, server restarted after {restarted_at} booking changes, {elapsed:.1f}s; "
        f"bookings changed once={once}, more than once={more}, decisions recorded={recorded}, "
        f"seat conflicts={conflicts}, commands stored={stored}"
    )
    assert once == N, f"lost {N - once} booking changes"
    assert more == 0, f"{more} bookings changed twice"
    assert recorded == N
    assert conflicts == 0
    assert stored == N, f"{stored} commands stored for {N} published: a retried publish was doubled"
