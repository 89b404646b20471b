"""The flight swarm runs under exactly the permissions ``busagents swarm permissions`` generates.

A real nats-server with one user per agent (its generated permissions, nothing more) and an
admin user for the test; every flight agent is a real ``busagents run`` process. The day is
played once; the test waits until every affected passenger is notified and then checks that
the server refused nothing, and that what is not granted really is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from busagents_flight.data import generate
from busagents_flight.feed import status_feed
from busagents_travel import DisruptionAssessed, PassengerNotified, RebookPassenger
from nats.aio.msg import Msg

from busagents import Bus
from busagents.contract import contract_info
from busagents.durable import DLQ_STREAM
from busagents.envelope import MSG_ID
from busagents.plugins import load_agent
from busagents.server import NatsServer
from busagents.swarm import Graph, load_swarm
from busagents.swarm.graph import inbox_prefix

ROOT = Path(__file__).resolve().parent.parent
SWARM = ROOT / "deploy" / "flight-swarm.toml"
FLIGHTS, PASSENGERS, SEED = 40, 3000, 7  # the bundled small day (FlightSettings defaults)
PASSWORD = "pw"


def _server_config(perms: dict[str, dict[str, Any]]) -> str:
    users = [
        {
            "user": name,
            "password": PASSWORD,
            "permissions": {
                "publish": {"allow": p["publish"]},
                "subscribe": {"allow": p["subscribe"]},
                **({"allow_responses": True} if p.get("allow_responses") else {}),
            },
        }
        for name, p in perms.items()
    ]
    users.append({"user": "admin", "password": PASSWORD})
    return f"authorization {{ users = {json.dumps(users)} }}\n"


def _url(server: NatsServer, user: str) -> str:
    return server.url.replace("nats://", f"nats://{user}:{PASSWORD}@")


class _Agents:
    """``busagents run NAME`` processes, each connected as its own user; stopped with SIGTERM."""

    def __init__(self, server: NatsServer, env: dict[str, str], logs: Path) -> None:
        self.server = server
        self.env = {**os.environ, **env}
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str) -> None:
        log = self.logs / f"{name}-{len(self.children)}.log"
        with log.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "busagents", "run", name, "--nats", _url(self.server, name)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append((name, child, log))

    def output(self) -> str:
        return "\n".join(f"--- {name}:\n{log.read_text(errors='replace')}" for name, _, log in self.children)

    def stop(self) -> None:
        for _, child, _ in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _, child, _ in self.children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@pytest.fixture
def agents_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        "BUSAGENTS_FLIGHT_FLIGHTS": str(FLIGHTS),
        "BUSAGENTS_FLIGHT_PASSENGERS": str(PASSENGERS),
        "BUSAGENTS_FLIGHT_SEED": str(SEED),
        "BUSAGENTS_FLIGHT_DAY_SECONDS": "0",
        "BUSAGENTS_FLIGHT_REASONER": "offline",
        "BUSAGENTS_FLIGHT_STORE": str(tmp_path / "bookings.sqlite3"),
        "BUSAGENTS_FLIGHT_OUTBOX": str(tmp_path / "outbox.jsonl"),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
    }


class _Progress:
    """What the admin sees of the day: disruptions, assessments, notifications, the monitor's heartbeats."""

    def __init__(self, updates: int) -> None:
        self.updates = updates
        self.status = 0
        self.disruptions = 0
        self.changed = 0
        self.assessed = 0
        self.affected = 0
        self.notified: set[tuple[str, str]] = set()
        self.dead_letters: list[str] = []
        self.monitor_caught_up = False
        self.monitors: dict[str, tuple[int, int]] = {}  # instance -> (handled, in flight)
        self.done = asyncio.Event()

    def check(self) -> None:
        if (
            self.monitor_caught_up
            and self.assessed == self.disruptions
            and len(self.notified) >= self.affected
            and not self.done.is_set()
        ):
            self.done.set()


async def _watch(admin: Bus, progress: _Progress) -> list[Any]:
    assessed = msgspec.json.Decoder(DisruptionAssessed)
    notified = msgspec.json.Decoder(PassengerNotified)
    stats = msgspec.json.Decoder(dict[str, Any])

    async def on_status(msg: Msg) -> None:
        progress.status += 1

    async def on_disruption(msg: Msg) -> None:
        progress.disruptions += 1
        progress.check()

    async def on_changed(msg: Msg) -> None:
        progress.changed += 1

    async def on_assessed(msg: Msg) -> None:
        e = assessed.decode(msg.data)
        progress.assessed += 1
        progress.affected += e.affected_passengers
        progress.check()

    async def on_notified(msg: Msg) -> None:
        e = notified.decode(msg.data)
        progress.notified.add((e.disruption_id, e.passenger_id))
        progress.check()

    async def on_dead(msg: Msg) -> None:
        progress.dead_letters.append(f"{msg.subject}: {(msg.headers or {}).get('Ba-Dlq-Reason', '')}")

    async def on_monitor_beat(msg: Msg) -> None:
        # handled counts status updates and booking changes; every disruption the monitor publishes
        # goes out before the heartbeat that counts its update (one connection: in order)
        # (summed over the monitor's replicas, each with its own heartbeats)
        beat = stats.decode(msg.data)
        progress.monitors[beat["instance"]] = (beat["handled"], beat["in_flight"])
        if progress.status == progress.updates and all(busy == 0 for _, busy in progress.monitors.values()):
            handled = sum(h for h, _ in progress.monitors.values())
            progress.monitor_caught_up = handled >= progress.updates + progress.changed
            progress.check()

    nc = admin.nc
    subs = [
        await nc.subscribe("travel.flight.status.*", cb=on_status),
        await nc.subscribe("travel.flight.delayed.*", cb=on_disruption),
        await nc.subscribe("travel.flight.cancelled.*", cb=on_disruption),
        await nc.subscribe("travel.booking.changed.*", cb=on_changed),
        await nc.subscribe(contract_info(DisruptionAssessed).subscribe_subject, cb=on_assessed),
        await nc.subscribe(contract_info(PassengerNotified).subscribe_subject, cb=on_notified),
        await nc.subscribe("busagents.dlq.>", cb=on_dead),
        await nc.subscribe("busagents.stats.flight-monitor", cb=on_monitor_beat),
    ]
    await admin.flush()
    return subs


async def test_the_flight_swarm_runs_under_its_generated_permissions_and_nothing_more(
    tmp_path: Path, agents_env: dict[str, str]
) -> None:
    config = load_swarm(SWARM)
    graph = Graph([load_agent(target) for target in config.targets().values()])
    perms = graph.permissions()
    assert set(perms) == set(config.agents)
    (tmp_path / "nats.conf").write_text(_server_config(perms))
    updates = len(status_feed(generate(FLIGHTS, PASSENGERS, SEED)))
    with NatsServer(config_file=tmp_path / "nats.conf") as server:
        admin = await Bus.connect(_url(server, "admin"), name="test-admin")
        agents = _Agents(server, agents_env, tmp_path)
        try:
            progress = _Progress(updates)
            subs = await _watch(admin, progress)
            others = [name for name in config.agents if name != "flight-feed"]
            for name in others:
                for _ in range(config.agents[name].replicas):
                    agents.start(name)
            # core NATS keeps nothing for an agent not yet listening: start the feed once all serve
            await admin.wait_for_agents(others, timeout=30)
            agents.start("flight-feed")
            try:
                await asyncio.wait_for(progress.done.wait(), 40)
            except TimeoutError:
                pytest.fail(
                    f"not finished: {progress.status}/{updates} updates, {progress.assessed}/{progress.disruptions} "
                    f"assessed, {len(progress.notified)}/{progress.affected} notified\n"
                    f"{server.log_tail(40)}\n{agents.output()[-6000:]}"
                )
            for sub in subs:
                await sub.unsubscribe()
        finally:
            agents.stop()
        log = server.log_tail(100_000)
        output = agents.output()
        assert "violation" not in log.lower(), log
        assert "permissions violation" not in output.lower(), output
        assert progress.dead_letters == []
        assert progress.disruptions > 0
        assert len(progress.notified) == progress.affected > 0

        # what is not granted is refused: the notifier may not command a rebooking
        refused = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if "permissions violation" in str(exc).lower() and not refused.done():
                refused.set_result(str(exc))

        notifier = await Bus.connect(
            _url(server, "flight-notifier"), inbox_prefix=inbox_prefix("flight-notifier"), error_cb=on_error
        )
        try:
            # every agent may dead-letter a durable message: stored with a JetStream ack on its inbox
            ack = await notifier.js.publish("busagents.dlq.flight-notifier", b"{}", timeout=5, headers={MSG_ID: "t1"})
            assert ack.stream == DLQ_STREAM
            rebook = contract_info(RebookPassenger)
            seen = await admin.nc.subscribe(rebook.subscribe_subject)
            await admin.flush()
            await notifier.nc.publish(f"{rebook.subject}.B1", b"{}")
            await notifier.flush()
            denied = await asyncio.wait_for(refused, 5)
            assert f'publish to "{rebook.subject}.b1"' in denied.lower()
            await notifier.nc.subscribe("_INBOX.flight-rebooker.>")  # nor read another agent's inbox
            await notifier.flush()
            await admin.flush()
            assert seen.pending_msgs == 0
        finally:
            await notifier.close()
            await admin.close()
        log = server.log_tail(100_000)
        assert '"$G/user:flight-notifier" - Publish Violation - Subject "travel.booking.rebook.B1"' in log, log
        assert '"$G/user:flight-notifier" - Subscription Violation - Subject "_INBOX.flight-rebooker.>"' in log, log


def test_an_agent_that_asks_for_approval_may_read_the_answers_and_a_waiting_one_the_heartbeats() -> None:
    config = load_swarm(SWARM)
    perms = Graph([load_agent(target) for target in config.targets().values()]).permissions()
    assert "busagents.llm.approval.decided.*" in perms["flight-reasoner"]["subscribe"]  # ApprovalGate.ask
    assert "busagents.llm.approval.decided.*" not in perms["flight-notifier"]["subscribe"]
    # the feed waits for the monitor and the context agent: their heartbeats, nobody else's
    assert [s for s in perms["flight-feed"]["subscribe"] if s.startswith("busagents.stats.")] == [
        "busagents.stats.flight-context",
        "busagents.stats.flight-monitor",
    ]
    assert perms["flight-reasoner"].get("allow_responses") is True  # it confirms an answer to `busagents llm approve`


def test_the_graph_derives_permissions_from_declarations_and_knows_no_llm() -> None:
    source = Path(sys.modules[Graph.__module__].__file__ or "").read_text()
    assert "llm" not in source  # `awaits = (ApprovalDecided,)`, not producing ApprovalRequested, grants the answers
