"""Fault: the nats-server is restarted mid-stream, with the same store directory.

10,000 durable Credit commands; the Ledger agent runs as its own OS process. The server is
stopped and started again on the same port while commands are being published and applied.
Publishers retry with the same message id, the consumer asks again once the server is back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents import Bus, NatsServer

from .fault_ledger import (
    count_effects,
    count_rows,
    publish_credits,
    spawn_ledger,
    stream_count,
    wait_for,
    wait_settled,
)

N = 10_000


async def test_nats_server_restart_mid_stream_loses_and_repeats_no_effect(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    server = NatsServer(store_dir=tmp_path / "nats").start()
    bus = await Bus.connect(server.url)
    agent = spawn_ledger(server.url, db, BUSAGENTS_ACK_WAIT="2")
    try:
        await publish_credits(bus, range(N // 2))
        await wait_for(lambda: count_effects(db)[0] >= N // 5, 30, "the first effects")
        restart = asyncio.create_task(asyncio.to_thread(server.restart))
        restarted_at = count_effects(db)[0]
        assert restarted_at < N // 2, "the agent was done before the restart: nothing was tested"
        await publish_credits(bus, range(N // 2, N))  # during the outage: retried with their ids
        await restart
        await wait_for(lambda: count_effects(db)[1] >= N, 60, f"{N} distinct effects")
        await wait_settled(bus, "BA_Credit", "ledger", 30)
        rows, distinct = count_effects(db)
        stored = await stream_count(bus, "BA_Credit")
        credited = await stream_count(bus, "BA_Credited")
        skipped = count_rows(db, "skipped")
    finally:
        agent.terminate()
        agent.wait(10)
        await bus.close()
        server.stop()
    elapsed = time.perf_counter() - started
    print(
        f"\nrestart: {N} messages, server restarted after {restarted_at} effects, {elapsed:.1f}s; store rows={rows} "
        f"distinct={distinct}; commands stored={stored}; redeliveries turned away={skipped}"
    )
    assert distinct == N, f"lost {N - distinct} effects"
    assert rows == N, f"{rows - N} effects applied twice"
    assert stored == N, f"{stored} commands stored for {N} published: a retried publish was doubled"
    assert credited == N, f"{credited} Credited events stored for {N} credits"
