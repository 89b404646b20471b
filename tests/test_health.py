"""``/healthz`` and ``/metrics`` of an agent process (issue 15): what probes and scrapers read."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import msgspec

from busagents import Agent, Bus, Context, NatsServer, Worker, event, on
from busagents.dlq import DLQ_SUBJECTS
from busagents.health import HealthServer

from .drain_agent import child_env


@event("test.health.ping")
class Ping(msgspec.Struct):
    n: int


class Pinged(Agent):
    name = "pinged"

    def __init__(self) -> None:
        self.seen: asyncio.Queue[int] = asyncio.Queue()

    @on(Ping)
    async def ping(self, p: Ping, ctx: Context) -> None:
        self.seen.put_nowait(p.n)


def sample(text: str, metric: str, agent: str) -> float:
    """The value of ``metric{agent=...}`` in a Prometheus text exposition."""
    found = re.search(rf'^{metric}{{agent="{agent}"}} (\S+)$', text, re.MULTILINE)
    assert found, f"no {metric} for {agent} in:\n{text}"
    return float(found.group(1))


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


async def test_healthz_follows_the_worker_and_metrics_count_handled_and_dead_lettered(bus: Bus) -> None:
    agent = Pinged()
    worker = Worker([agent], bus)
    health = HealthServer(worker)
    await health.start()
    try:
        async with aiohttp.ClientSession() as session:
            code, body = await get(session, f"{health.url}/healthz")
            assert (code, msgspec.json.decode(body)["status"]) == (503, "new")  # not serving yet: not ready
            await worker.start()
            code, body = await get(session, f"{health.url}/healthz")
            assert code == 200
            assert msgspec.json.decode(body) == {
                "status": "serving",
                "connected": True,
                "draining": False,
                "agents": ["pinged"],
            }
            dead = await bus.nc.subscribe(DLQ_SUBJECTS)
            for n in range(3):
                await bus.publish(Ping(n=n))
            await bus.nc.publish("test.health.ping", b"not json")  # dead-lettered
            assert sorted([await asyncio.wait_for(agent.seen.get(), 10) for _ in range(3)]) == [0, 1, 2]
            await dead.next_msg(timeout=10)
            code, text = await get(session, f"{health.url}/metrics")
            assert code == 200
            assert sample(text, "busagents_messages_handled_total", "pinged") == 3
            assert sample(text, "busagents_messages_dead_lettered_total", "pinged") == 1
            assert sample(text, "busagents_messages_in_flight", "pinged") == 0
            await worker.drain()
            code, body = await get(session, f"{health.url}/healthz")
            assert (code, msgspec.json.decode(body)["draining"]) == (503, True)
    finally:
        await worker.drain()
        await health.stop()


async def test_busagents_run_serves_healthz_on_its_http_port(bus: Bus, nats_server: NatsServer, tmp_path: Path) -> None:
    beats = await bus.nc.subscribe("busagents.stats.slow")  # the worker heartbeats once it serves
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "run", "drain_agent:Slow", "--nats", nats_server.url, "--http-port", "0",
        env={**child_env(), "BUSAGENTS_LOG_LEVEL": "WARNING"}, cwd=tmp_path, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, "busagents run exited before it served /healthz"
            if found := re.search(r"/healthz and /metrics on (http://\S+)", line):
                url = found.group(1)
        await beats.next_msg(timeout=60)
        async with aiohttp.ClientSession() as session:
            code, body = await get(session, f"{url}/healthz")
            assert (code, msgspec.json.decode(body)["status"]) == (200, "serving")
            code, text = await get(session, f"{url}/metrics")
            assert code == 200 and sample(text, "busagents_messages_handled_total", "slow") == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
