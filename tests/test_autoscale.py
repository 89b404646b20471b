"""Local autoscaling (issue 15): ``autoscale = { min, max, lag }`` in swarm.toml follows the durable lag."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from busagents import Bus, NatsServer
from busagents.errors import ConfigError
from busagents.plugins import load_agent
from busagents.swarm.autoscale import durable_consumers
from busagents.swarm.config import SwarmConfig, load_swarm
from busagents.swarm.supervisor import Supervisor

from .autoscale_agent import Crunched, Cruncher, Job

JOBS = 1000
RULE = {"min": 1, "max": 3, "lag": 100, "interval": 0.25, "up_after": 2, "down_after": 3}


def _config(db: Path) -> SwarmConfig:
    env = {
        "PYTHONPATH": str(Path(__file__).parent.parent),  # tests.autoscale_agent
        "AUTOSCALE_DB": str(db),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
        "BUSAGENTS_DRAIN_TIMEOUT": "20",
    }
    return SwarmConfig.model_validate(
        {"agents": {"autoscaled": {"agent": "tests.autoscale_agent:Cruncher", "autoscale": RULE, "env": env}}}
    )


class _Watch:
    """The supervisor's events, as awaitable conditions."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.most = 1
        self.reached_max = asyncio.Event()
        self.back_to_min = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("autoscale autoscaled: lag") and "adding" in line:
            self.most = max(self.most, int(line.rsplit("(", 1)[1].split("/")[0]))
            if self.most == RULE["max"]:
                self.reached_max.set()
        if self.reached_max.is_set() and "draining" in line and line.endswith(f"({RULE['min']})"):
            self.back_to_min.set()


async def test_a_burst_of_durable_work_scales_up_to_max_and_drains_back_to_min_losing_and_repeating_nothing(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "effects.sqlite3"
    watch = _Watch()
    supervisor = Supervisor(_config(db), nats_server.url, on_event=watch, stop_timeout=40)
    crunched: Counter[int] = Counter()
    pids: set[int] = set()
    all_done = asyncio.Event()

    async def on_crunched(msg: Msg) -> None:
        c = msgspec.json.decode(msg.data, type=Crunched)
        crunched[c.n] += 1
        pids.add(c.pid)
        if len(crunched) == JOBS:
            all_done.set()

    sub = await bus.nc.subscribe("test.autoscale.crunched", cb=on_crunched)
    stop = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop))
    try:
        await bus.wait_for_agents(["autoscaled"], timeout=60)
        for start in range(0, JOBS, 100):  # the burst: stored by JetStream before anyone can take it
            await asyncio.gather(*(bus.publish(Job(n=n)) for n in range(start, start + 100)))
        await asyncio.wait_for(watch.reached_max.wait(), 90)
        await asyncio.wait_for(all_done.wait(), 120)
        await asyncio.wait_for(watch.back_to_min.wait(), 60)
        assert supervisor.count("autoscaled") == RULE["min"]
    finally:
        stop.set()
        bad = await asyncio.wait_for(run, 90)
        await sub.unsubscribe()
    assert bad == 0, watch.lines  # every replica drained and exited cleanly
    assert watch.most == RULE["max"]
    assert len(pids) >= 2  # the work was shared by the replicas added
    assert sorted(crunched) == list(range(JOBS)) and set(crunched.values()) == {1}, "a job lost or repeated"
    with sqlite3.connect(db) as conn:  # the effects themselves: each job's once
        rows = conn.execute("SELECT count(*), min(times), max(times) FROM effects").fetchone()
    assert rows == (JOBS, 1, 1)
    assert sum(line.startswith("autoscale autoscaled: lag") and "draining" in line for line in watch.lines) == (
        RULE["max"] - RULE["min"]
    )


async def test_the_lag_is_read_from_the_consumers_the_workers_create(bus: Bus) -> None:
    assert durable_consumers(bus, Cruncher) == [("BA_Job", "autoscaled")]
    flight = load_agent("flight-monitor")  # an ordered contract: one consumer per partition
    consumers = durable_consumers(bus, flight)
    assert ("BA_FlightStatusUpdated", "flight-monitor-p0") in consumers and len(consumers) >= 16


def test_autoscale_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "swarm.toml"
    path.write_text("[agents.a]\nreplicas = 2\nautoscale = { min = 1, max = 4, lag = 10 }\n")
    with pytest.raises(ConfigError, match="set replicas or autoscale, not both"):
        load_swarm(path)
    path.write_text("[agents.a]\nautoscale = { min = 3, max = 2, lag = 10 }\n")
    with pytest.raises(ConfigError, match=r"max \(2\) is below min \(3\)"):
        load_swarm(path)
    config = SwarmConfig.model_validate({"agents": {"a": {"autoscale": {"max": 2, "lag": 5}}}})
    problems = config.check({"a": load_agent("flight-context")})  # no durable handler: nothing to follow
    assert any(p.severity == "error" and "no durable handler" in p.message for p in problems)
