"""Fault: a 3-node nats-server cluster with R3 streams loses one node mid-stream.

10,000 durable Credit commands on a cluster started by the test on loopback ports; the
Ledger agent runs as its own OS process connected to all three. The node leading the
command stream is killed (SIGKILL) while commands are being published and applied; the
two survivors elect a new leader and nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents import Bus
from busagents.server import NatsCluster

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


async def test_cluster_node_killed_mid_stream_loses_and_repeats_no_effect(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    with NatsCluster(3, base_dir=tmp_path / "cluster") as cluster:
        bus = await Bus.connect(cluster.url, replicas=3)
        agent = spawn_ledger(cluster.url, db, BUSAGENTS_ACK_WAIT="2", BUSAGENTS_REPLICAS="3")
        try:
            await publish_credits(bus, range(N // 2))
            info = await bus.js.stream_info("BA_Credit")
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            leader = info.cluster.leader
            await wait_for(lambda: count_effects(db)[0] >= N // 5, 30, "the first effects")
            victim = next(s for s in cluster.servers if s.name == leader)
            victim.kill()
            killed_at = count_effects(db)[0]
            assert killed_at < N // 2, "the agent was done before the node died: nothing was tested"
            await publish_credits(bus, range(N // 2, N))  # retried with their ids across the election
            await wait_for(lambda: count_effects(db)[1] >= N, 60, f"{N} distinct effects")
            await wait_settled(bus, "BA_Credit", "ledger", 30)
            rows, distinct = count_effects(db)
            stored = await stream_count(bus, "BA_Credit")
            credited = await stream_count(bus, "BA_Credited")
            skipped = count_rows(db, "skipped")
            new_leader = (await bus.js.stream_info("BA_Credit")).cluster
        finally:
            agent.terminate()
            await asyncio.to_thread(agent.wait, 10)
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\ncluster: {N} messages, stream leader {leader} killed after {killed_at} effects, {elapsed:.1f}s; "
        f"store rows={rows} distinct={distinct}; commands stored={stored}; redeliveries turned away={skipped}; "
        f"new leader {new_leader.leader if new_leader else '?'}"
    )
    assert distinct == N, f"lost {N - distinct} effects"
    assert rows == N, f"{rows - N} effects applied twice"
    assert stored == N, f"{stored} commands stored for {N} published"
    assert credited == N, f"{credited} Credited events stored for {N} credits"
