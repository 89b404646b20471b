"""Fault: the agent process is killed with SIGKILL mid-stream and restarted.

10,000 durable Credit commands; the Ledger agent runs as its own OS process and is killed
while it is applying them. Its unacknowledged messages are redelivered to the restarted
process; the idempotency table makes sure no credit is applied twice.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from busagents import Bus, NatsServer

from .fault_ledger import count_effects, count_rows, publish_credits, spawn_ledger, stream_count, wait_for, wait_settled

N = 10_000


async def test_agent_killed_with_sigkill_mid_stream_and_restarted_loses_and_repeats_no_effect(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    with NatsServer(store_dir=tmp_path / "nats") as server:
        bus = await Bus.connect(server.url)
        agent = spawn_ledger(server.url, db, BUSAGENTS_ACK_WAIT="2")
        try:
            await publish_credits(bus, range(N // 2))  # half before the kill, stored in the stream
            await wait_for(lambda: count_effects(db)[0] >= N // 5, 30, "the first effects")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            killed_at = count_effects(db)[0]
            assert killed_at < N // 2, "the agent finished before it was killed: nothing was tested"
            # the other half arrives while the agent is down
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
        f"\nkill: {N} messages, killed after {killed_at} effects, {elapsed:.1f}s; store rows={rows} "
        f"distinct={distinct}; redeliveries turned away by the idempotency table={skipped}"
    )
    assert distinct == N, f"lost {N - distinct} effects"
    assert rows == N, f"{rows - N} effects applied twice"
    assert credited == N, f"{credited} Credited events stored for {N} credits: outputs were not de-duplicated"
