"""The flight swarm beyond one machine: a 3-node nats-server cluster with R3 streams and buckets,
every agent at 2 replicas (the feed at 1) as ``busagents run`` processes spread over the three
nodes, the two replicas of an agent on different nodes; the node leading the feed's stream is
SIGKILLed mid-day, and everyone is still served exactly once.

Each agent is given the URL of its own node only: when that node dies it goes on with another
one the cluster told it about. The booking store is one SQLite file shared by the rebookers on
this machine; what is tested here is NATS.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from busagents import Bus
from busagents.server import NatsCluster

from .flight_swarm import (
    AGENTS,
    AgentRun,
    durable_consumers,
    flight_env,
    outcome,
    settle_consumers,
    the_day,
    wait_for_instances,
    wait_for_stored,
)
from .test_flight_swarm import _check

pytestmark = pytest.mark.timeout(300)

DAY, UPDATES = the_day()
FEED_STREAM = "BA_FlightStatusUpdated"
_RECONNECTED = re.compile(r"^(\S+ \S+) INFO busagents\.bus: nats: reconnected to (\S+)", re.M)


def _reconnects(run: AgentRun, since: float) -> list[str]:
    """When (seconds after ``since``) and where the agent reconnected, from its log."""
    found = []
    for stamp, url in _RECONNECTED.findall(run.log.read_text(errors="replace")):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.append(f"{at - since:+.2f}s {url}")
    return found


async def test_a_node_killed_mid_day_still_serves_everyone_exactly_once(tmp_path: Path) -> None:
    env = flight_env(tmp_path, BUSAGENTS_FLIGHT_DAY_SECONDS="6", BUSAGENTS_ACK_WAIT="3", BUSAGENTS_REPLICAS="3")
    names = [name for agent in AGENTS for name in (agent, agent)] + ["flight-feed"]
    with NatsCluster(3, base_dir=tmp_path / "cluster") as cluster:
        nodes = cluster.servers
        runs = [  # round robin: the two replicas of an agent are on two different nodes
            AgentRun(name, nodes[i % 3].url, env, tmp_path / f"{name}-{i}.log") for i, name in enumerate(names)
        ]
        bus = await Bus.connect(cluster.url, name="cluster-test")
        try:
            instances: dict[str, set[str]] = {}
            for run in runs:
                instances.setdefault(run.name, set()).add(run.instance)
            await wait_for_instances(bus, instances, timeout=90)  # every replica, not one per agent
            consumers = await durable_consumers(bus)
            await wait_for_stored(bus, FEED_STREAM, UPDATES // 2, timeout=60)
            info = await bus.js.stream_info(FEED_STREAM)
            assert info.config.num_replicas == 3 and info.cluster is not None
            victim = next(s for s in nodes if s.name == info.cluster.leader)
            killed_at = time.time()
            victim.kill()
            stored_at_kill = int(info.state.messages)
            assert stored_at_kill < UPDATES, "the feed was over before the node died: nothing was tested"
            await settle_consumers(bus, consumers, UPDATES, timeout=150)
            settled_in = time.time() - killed_at
            result = await outcome(bus, tmp_path, DAY)
            after = (await bus.js.stream_info(FEED_STREAM)).cluster
        except BaseException:
            for run in runs:
                print(f"----- {run.log.stem} on {run.url}\n{run.output()}")
            for node in nodes:
                print(f"----- {node.name}\n{node.log_tail(40)}")
            raise
        finally:
            await bus.close()
            for run in runs:
                run.terminate()
            codes = {run.log.stem: run.stop() for run in runs}
    moved = {run.log.stem: _reconnects(run, killed_at) for run in runs if run.url == victim.url}
    print(
        f"\ncluster: feed leader {victim.name} killed with {stored_at_kill}/{UPDATES} updates stored; "
        f"its agents reconnected: {moved}; settled {settled_in:.1f}s after the kill, new feed leader "
        f"{after.leader if after else '?'}; affected {result.affected}, notified {result.notified}, "
        f"decisions {result.decisions}, re-decisions {result.rejected}"
    )
    assert moved and all(moved.values()), f"agents of {victim.name} that did not reconnect: {moved}"
    assert not any(codes.values()), codes
    _check(result)
