"""Fault: a 3-node nats-server cluster with R3 streams loses one node mid-stream.

10,000 durable RebookPassenger decisions on a cluster started by the test on loopback
ports; the rebooker runs as its own OS process connected to all three nodes. The node
leading the command stream is killed (SIGKILL) while decisions are being published and
applied; the two survivors elect a new leader and every booking changes exactly once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents import Bus
from busagents.server import NatsCluster

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


async def test_cluster_node_killed_mid_stream_loses_and_repeats_no_booking_change(tmp_path: Path) -> None:
    store = str(tmp_path / "bookings.sqlite3")
    batch = decisions(N)
    await load_store(store)
    started = time.perf_counter()
    with NatsCluster(3, base_dir=tmp_path / "cluster") as cluster:
        bus = await Bus.connect(cluster.url, replicas=3)
        agent = spawn_rebooker(cluster.url, store, BUSAGENTS_ACK_WAIT="2", BUSAGENTS_REPLICAS="3")
        try:
            await publish_decisions(bus, batch[: N // 2])
            info = await bus.js.stream_info(STREAM)
            assert info.config.num_replicas == 3
            assert info.cluster is not None
            leader = info.cluster.leader
            await wait_for(lambda: count_changes(store)[0] >= N // 5, 60, "the first booking changes")
            next(s for s in cluster.servers if s.name == leader).kill()
            killed_at = count_changes(store)[0]
            assert killed_at < N // 2, "the rebooker was done before the node died: nothing was tested"
            await publish_decisions(bus, batch[N // 2 :])  # retried with their ids across the election
            await wait_for(lambda: count_changes(store)[2] >= N, 90, f"{N} decisions applied")
            await wait_settled(bus, STREAM, CONSUMER, 30)
            once, more, recorded = count_changes(store)
            conflicts = await seat_conflicts(store)
            stored = await stream_count(bus, STREAM)
            after = (await bus.js.stream_info(STREAM)).cluster
        finally:
            agent.terminate()
            await asyncio.to_thread(agent.wait, 10)
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\ncluster: {N} RebookPassenger, stream leader {leader} killed after {killed_at} booking changes, "
        f"{elapsed:.1f}s; bookings changed once={once}, more than once={more}, decisions recorded={recorded}, "
        f"seat conflicts={conflicts}, commands stored={stored}, new leader {after.leader if after else '?'}"
    )
    assert once == N, f"lost {N - once} booking changes"
    assert more == 0, f"{more} bookings changed twice"
    assert recorded == N
    assert conflicts == 0
    assert stored == N
