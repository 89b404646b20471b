"""Fault: the agent process is killed with SIGKILL mid-stream and restarted.

The rebooker runs as its own OS process (``busagents run flight-rebooker``) and is killed
while it applies 10,000 durable RebookPassenger decisions; its unacknowledged decisions are
redelivered to the restarted process. A second test does the same with a minimal agent
whose store has no idempotency of its own, so a repeated effect would show as a second row:
there the framework's idempotency helper is what keeps the effects exactly once.
"""

from __future__ import annotations

import signal
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
from .fault_ledger import count_effects, count_rows, publish_credits, spawn_ledger, stream_count, wait_for, wait_settled

N = 10_000


async def test_rebooker_killed_with_sigkill_mid_stream_and_restarted_loses_and_repeats_no_booking_change(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "bookings.sqlite3")
    batch = decisions(N)
    await load_store(store)
    started = time.perf_counter()
    with NatsServer(store_dir=tmp_path / "nats") as server:
        bus = await Bus.connect(server.url)
        agent = spawn_rebooker(server.url, store, BUSAGENTS_ACK_WAIT="2")
        try:
            await publish_decisions(bus, batch[: N // 2])  # half before the kill, stored in the stream
            await wait_for(lambda: count_changes(store)[0] >= N // 5, 60, "the first booking changes")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            killed_at = count_changes(store)[0]
            assert killed_at < N // 2, "the rebooker finished before it was killed: nothing was tested"
            await publish_decisions(bus, batch[N // 2 :])  # the other half while the rebooker is down
            agent = spawn_rebooker(server.url, store, BUSAGENTS_ACK_WAIT="2")
            await wait_for(lambda: count_changes(store)[2] >= N, 90, f"{N} decisions applied")
            await wait_settled(bus, STREAM, CONSUMER, 30)
            once, more, recorded = count_changes(store)
            conflicts = await seat_conflicts(store)
            stored = await stream_count(bus, STREAM)
        finally:
            agent.terminate()
            agent.wait(10)
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\nkill (flight): {N} RebookPassenger, rebooker killed after {killed_at} booking changes, {elapsed:.1f}s; "
        f"bookings changed once={once}, more than once={more}, decisions recorded={recorded}, "
        f"seat conflicts={conflicts}, commands stored={stored}"
    )
    assert once == N, f"lost {N - once} booking changes"
    assert more == 0, f"{more} bookings changed twice"
    assert recorded == N
    assert conflicts == 0
    assert stored == N


async def test_agent_killed_with_sigkill_mid_stream_and_restarted_repeats_no_effect_thanks_to_idempotency(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    with NatsServer(store_dir=tmp_path / "nats") as server:
        bus = await Bus.connect(server.url)
        agent = spawn_ledger(server.url, db, BUSAGENTS_ACK_WAIT="2")
        try:
            await publish_credits(bus, range(N // 2))
            await wait_for(lambda: count_effects(db)[0] >= N // 5, 30, "the first effects")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            killed_at = count_effects(db)[0]
            assert killed_at < N // 2, "the agent finished before it was killed: nothing was tested"
            await publish_credits(bus, range(N // 2, N))
            agent = spawn_ledger(server.url, db, BUSAGENTS_ACK_WAIT="2")
            await wait_for(lambda: count_effects(db)[1] >= N, 60, f"{N} distinct effects")
            await wait_settled(bus, "BA_Credit", "ledger", 30)
            rows, distinct = count_effects(db)
            credited = await stream_count(bus, "BA_Credited")
            skipped = count_rows(db, "skipped")
        finally:
            agent.terminate()
            agent.wait(10)
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\nkill (ledger): {N} messages, killed after {killed_at} effects, {elapsed:.1f}s; store rows={rows} "
        f"distinct={distinct}; redeliveries turned away by the idempotency table={skipped}"
    )
    assert distinct == N, f"lost {N - distinct} effects"
    assert rows == N, f"{rows - N} effects applied twice"
    assert credited == N, f"{credited} Credited events stored for {N} credits: outputs were not de-duplicated"
