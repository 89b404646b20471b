"""Every agent instance answers the NATS services protocol; ``busagents ps`` lists the swarm from it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.micro.service import ServiceInfo, ServicePing, ServiceStats, ServiceVerb

from busagents import Agent, Bus, Context, PermanentError, command, contract_info, event, on
from busagents.cli.ps import swarm_status
from busagents.micro import discover
from busagents.server import NatsServer
from busagents.settings import Settings
from busagents.testing import run_agents

from .drain_agent import Done, Job, child_env

Answers = list[dict[str, Any]]


@event("test.micro.order", key="order_id")
class Order(msgspec.Struct):
    order_id: str


@command("test.micro.pack", key="order_id", durable=True)
class Pack(msgspec.Struct):
    order_id: str


@event("test.micro.packed", key="order_id")
class Packed(msgspec.Struct):
    order_id: str


class Till(Agent):
    """Takes orders, asks the packer to pack them."""

    name = "till"
    produces = (Pack,)

    @on(Order)
    async def take(self, order: Order, ctx: Context) -> Pack:
        if order.order_id == "bad":
            raise ValueError("no such order")
        return Pack(order_id=order.order_id)


class Packer(Agent):
    name = "packer"
    produces = (Packed,)

    @on(Pack)
    async def pack(self, cmd: Pack, ctx: Context) -> Packed:
        if cmd.order_id == "broken":
            raise PermanentError("cannot pack a broken order")
        return Packed(order_id=cmd.order_id)


async def test_each_agent_of_a_worker_answers_ping_info_and_stats_as_nats_micro_does(bus: Bus) -> None:
    async with run_agents(bus, Till(), Packer()):
        async with bus.expect(Packed, where=lambda p: p.order_id == "o1"):
            await bus.publish(Order(order_id="o1"))
        async with bus.expect(Order, where=lambda o: o.order_id == "bad"):
            await bus.publish(Order(order_id="bad"))
        async with bus.expect(Pack, where=lambda p: p.order_id == "broken"):
            await bus.publish(Pack(order_id="broken"))

        pings = await discover(bus.nc, ServiceVerb.PING)
        infos = await discover(bus.nc, ServiceVerb.INFO)
        # the dead letters are written before the counters move on: ask until both are counted
        stats = await _stats_until(bus, lambda s: _data(s, "till", _name(Order))["dead_lettered"] == 1)

        assert sorted(p["name"] for p in pings) == ["packer", "till"]
        for ping in pings:
            parsed = ServicePing.from_dict(ping)  # nats-py's own reader of the protocol
            assert ping["type"] == "io.nats.micro.v1.ping_response"
            assert parsed.metadata["busagents.pid"] == str(os.getpid())
        ids = {p["name"]: p["id"] for p in pings}

        info = {i["name"]: ServiceInfo.from_dict(i) for i in infos}
        assert {i["type"] for i in infos} == {"io.nats.micro.v1.info_response"}
        assert info["till"].description == "Takes orders, asks the packer to pack them."
        till = {e.metadata["contract"]: e for e in info["till"].endpoints}
        assert till[_name(Order)].subject == "test.micro.order.*"
        assert till[_name(Order)].queue_group == "till"
        assert till[_name(Order)].metadata["direction"] == "consumes"
        assert till[_name(Order)].metadata["delivery"] == "core"
        assert till[_name(Pack)].metadata["direction"] == "produces"
        packer = {e.metadata["contract"]: e for e in info["packer"].endpoints}
        assert packer[_name(Pack)].metadata["delivery"] == "durable"
        assert packer[_name(Pack)].metadata["consumer"] == "packer"
        assert packer[_name(Pack)].metadata["stream"].startswith("BA_")

        by_name = {s["name"]: ServiceStats.from_dict(s) for s in stats}
        order = next(e for e in by_name["till"].endpoints if e.subject == "test.micro.order.*")
        assert (order.num_requests, order.num_errors) == (2, 1)
        assert 0 < order.average_processing_time <= order.processing_time
        pack = next(e for e in by_name["packer"].endpoints if e.subject == "test.micro.pack.*")
        assert (pack.num_requests, pack.num_errors) == (2, 1)
        assert pack.data is not None and pack.data["dead_lettered"] == 1 and pack.data["handled"] == 1

        # the .<name> and .<name>.<id> forms reach only that agent, that instance
        only = await discover(bus.nc, ServiceVerb.PING, "packer")
        assert [p["id"] for p in only] == [ids["packer"]]
        direct = await discover(bus.nc, ServiceVerb.STATS, f"till.{ids['till']}")
        assert [s["name"] for s in direct] == ["till"]

        # a message JetStream gave up on (its handler's process died each time) counts as dead-lettered too
        stream = packer[_name(Pack)].metadata["stream"]
        seq = (await bus.js.stream_info(stream)).state.first_seq
        advisory = {"stream": stream, "stream_seq": seq, "deliveries": 5}
        await bus.nc.publish(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.packer", json.dumps(advisory).encode()
        )
        await _stats_until(bus, lambda s: _data(s, "packer", _name(Pack))["dead_lettered"] == 2)

        status = {a.agent: a for a in await swarm_status(bus)}
        assert status["packer"].lag == 0  # a durable consumer with nothing waiting
        assert status["till"].lag is None  # core NATS only
        assert (status["till"].handled, status["till"].dead_lettered) == (1, 1)

    assert await discover(bus.nc, ServiceVerb.PING, timeout=0.3) == []  # drained: no longer listed


async def test_ps_lists_replicas_and_a_killed_one_is_gone_within_the_heartbeat_interval(
    bus: Bus, nats_server: NatsServer
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "busagents",
        "run",
        "drain_agent:Slow",
        "--replicas",
        "2",
        "--nats",
        nats_server.url,
        env=child_env(),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await bus.wait_for_agents(["slow"], timeout=30)
        listed = await _ps_until(nats_server.url, lambda agents: _replicas(agents) == 2)
        async with bus.expect(Done, where=lambda d: d.n == 7, timeout=10):
            await bus.publish(Job(n=7))
        listed = await _ps_until(nats_server.url, lambda agents: agents[0]["handled"] == 1)
        (slow,) = listed
        assert slow["agent"] == "slow" and slow["failed"] == 0 and slow["dead_lettered"] == 0
        assert slow["last_handled"] is not None and slow["last_handled"] <= time.time()
        pids = [i["pid"] for i in slow["instances"]]
        assert len(set(pids)) == 2

        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        while True:  # each round is one broadcast that a dead instance cannot answer
            status = await swarm_status(bus, timeout=1.0)
            if [i.pid for a in status for i in a.instances] == [pids[1]]:
                break
            assert time.monotonic() - killed < 30, f"still listed: {status}"
        gone_after = time.monotonic() - killed
        print(f"killed instance gone from ps after {gone_after:.2f}s")
        assert gone_after < Settings().heartbeat_interval
        listed = await _ps(nats_server.url)
        assert [i["pid"] for i in listed[0]["instances"]] == [pids[1]]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_ps_says_when_no_agent_answers(nats_server: NatsServer) -> None:
    out = await _run_ps(nats_server.url, "--wait", "0.2")
    assert "no agents answer" in out


async def _stats_until(bus: Bus, done: Callable[[Answers], bool]) -> Answers:
    async with asyncio.timeout(10):
        while True:  # each round is one broadcast and its answers
            stats = await discover(bus.nc, ServiceVerb.STATS)
            if len(stats) == 2 and done(stats):
                return stats


def _data(stats: Answers, agent: str, contract: str) -> dict[str, Any]:
    (answer,) = [s for s in stats if s["name"] == agent]
    return next(e["data"] for e in answer["endpoints"] if e["name"] == contract.replace(".", "_"))


def _name(contract: type[Any]) -> str:
    return contract_info(contract).name


def _replicas(agents: Answers) -> int:
    return sum(a["replicas"] for a in agents)


async def _ps_until(url: str, done: Callable[[Answers], bool]) -> Answers:
    async with asyncio.timeout(30):
        while True:  # each round is one `busagents ps`
            agents = await _ps(url)
            if agents and done(agents):
                return agents


async def _ps(url: str) -> Answers:
    agents: Answers = json.loads(await _run_ps(url, "--json"))
    return agents


async def _run_ps(url: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "ps", "--nats", url, *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return out.decode()
