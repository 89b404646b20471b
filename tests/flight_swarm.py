"""Helpers of the flight swarm tests: run ``busagents swarm up`` on a test's own nats-server, wait
until the day has settled, and read what happened from JetStream, the outbox and the booking store.
On a cluster: each replica a ``busagents run`` on a node of its own, and the day settled by name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats.aio.msg
import nats.errors
import nats.js.errors
import psutil
from busagents_flight.data import AirlineDay, generate
from busagents_flight.feed import status_feed
from busagents_flight.store import open_store
from busagents_travel import (
    DisruptionAssessed,
    FlightCancelled,
    FlightDelayed,
    FlightStatusUpdated,
    RebookGroup,
    RebookRejected,
)

from busagents import Bus
from busagents.contract import contract_info

AGENTS = ("flight-context", "flight-monitor", "flight-reasoner", "flight-rebooker", "flight-notifier")
#: Long-delay rules of the monitor (agents/busagents_flight/monitor.py), for the ground truth.
_THRESHOLD, _AGAIN = 180, 120


def swarm_file(path: Path, replicas: int, *, agents: tuple[str, ...] = AGENTS) -> Path:
    lines = ["max_restarts = 10", ""]
    for name in agents:
        lines += [f"[agents.{name}]", f"replicas = {replicas}", ""]
    lines += ["[agents.flight-feed]", ""]  # restarted too: it replays with the same ids, stored once
    path.write_text("\n".join(lines))
    return path


def flight_env(tmp: Path, flights: int = 40, passengers: int = 3000, seed: int = 7, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "BUSAGENTS_FLIGHT_FLIGHTS": str(flights),
        "BUSAGENTS_FLIGHT_PASSENGERS": str(passengers),
        "BUSAGENTS_FLIGHT_SEED": str(seed),
        "BUSAGENTS_FLIGHT_REASONER": "offline",
        "BUSAGENTS_FLIGHT_STORE": str(tmp / "bookings.sqlite3"),
        "BUSAGENTS_FLIGHT_OUTBOX": str(tmp / "outbox.jsonl"),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.5",
        **extra,
    }


class SwarmUp:
    """``busagents swarm up FILE --nats URL`` as a child process; its replicas found with psutil."""

    def __init__(self, swarm: Path, url: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "busagents", "--log-level", "INFO", "swarm", "up", str(swarm), "--nats", url],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def replicas(self, agent: str) -> list[psutil.Process]:
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "run" in argv and argv[argv.index("run") + 1 :][:1] == [agent]:
                found.append(child)
        return found

    def kill_one(self, agent: str) -> int:
        """SIGKILL one replica of ``agent``; its pid."""
        victims = self.replicas(agent)
        assert victims, f"no running replica of {agent}\n{self.output()}"
        victims[0].send_signal(signal.SIGKILL)
        return int(victims[0].pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return int(self.process.wait(60))
        except subprocess.TimeoutExpired:
            self.process.kill()
            return int(self.process.wait())


async def stream_messages(bus: Bus, contract: type[object]) -> list[tuple[str, bytes]]:
    """Every (subject, body) kept in a durable contract's stream, in order."""
    stream = f"BA_{contract_info(contract).name}"
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []
    if not info.state.messages:
        return []
    out = []
    for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
        try:
            msg = await bus.js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((msg.subject or "", msg.data or b""))
    return out


async def wait_for_feed(bus: Bus, stored: int, timeout: float) -> None:
    """Wait until the feed's stream holds ``stored`` updates."""
    await _poll(bus, lambda counts: counts.get("BA_FlightStatusUpdated", 0) >= stored, timeout, "the feed")


async def settle(bus: Bus, updates: int, timeout: float) -> None:
    """Wait until the whole feed is stored and no durable consumer has anything pending or unacknowledged."""
    await wait_for_feed(bus, updates, timeout)
    await _until_quiet(lambda: _busy_consumers(bus), timeout)


async def _until_quiet(busy_now: Callable[[], Awaitable[list[str]]], timeout: float) -> None:
    """Ask the server until three reads in a row find no consumer busy (nothing pending, in flight or
    being redelivered): there is no event for that, only the server's own account of its consumers."""
    deadline = asyncio.get_running_loop().time() + timeout
    quiet = 0
    while True:
        busy = await busy_now()
        quiet = quiet + 1 if not busy else 0
        if quiet >= 3:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the day did not settle within {timeout}s: {busy}")
        await asyncio.sleep(0.2)


async def _busy_consumers(bus: Bus) -> list[str]:
    busy = []
    try:
        for stream in await bus.js.streams_info():
            name = stream.config.name or ""
            if not name.startswith("BA_"):
                continue
            for consumer in await bus.js.consumers_info(name):
                if consumer.config.durable_name and (consumer.num_pending or consumer.num_ack_pending):
                    busy.append(
                        f"{name}/{consumer.name}: {consumer.num_pending} pending, {consumer.num_ack_pending} ack"
                    )
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        busy.append(repr(exc))
    return busy


async def _poll(bus: Bus, done: object, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        counts: dict[str, int] = {}
        try:
            for stream in await bus.js.streams_info():
                counts[stream.config.name or ""] = int(stream.state.messages)
        except (nats.errors.Error, nats.js.errors.Error):
            pass
        if done(counts):  # type: ignore[operator]
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s: {counts}")
        await asyncio.sleep(0.1)


@dataclass
class DayOutcome:
    """What a settled day did, read from JetStream, the outbox and the store."""

    assessed: dict[str, int]  # disruption id -> affected passengers
    affected: int
    notices: Counter[tuple[str, str]]  # (disruption id, passenger id) -> lines in the outbox
    decisions: int
    rejected: int
    seat_conflicts: int
    stranded: int
    disruptions: list[FlightDelayed | FlightCancelled] = field(default_factory=list)

    @property
    def notified(self) -> int:
        return len(self.notices)

    def unserved(self) -> dict[str, tuple[int, int]]:
        """Disruptions whose affected passengers were not all notified: id -> (affected, notified)."""
        told = Counter(d for d, _ in self.notices)
        return {d: (n, told[d]) for d, n in self.assessed.items() if told[d] != n}

    @property
    def told_twice(self) -> int:
        return sum(1 for n in self.notices.values() if n > 1)


async def outcome(bus: Bus, tmp: Path, day: AirlineDay) -> DayOutcome:
    assessed: dict[str, int] = {}
    for _, data in await stream_messages(bus, DisruptionAssessed):
        a = msgspec.json.decode(data, type=DisruptionAssessed)
        assessed[a.disruption_id] = a.affected_passengers
    notices: Counter[tuple[str, str]] = Counter()
    outbox = tmp / "outbox.jsonl"
    text = outbox.read_text() if outbox.exists() else ""
    for line in text[: text.rfind("\n") + 1].splitlines():  # not a torn last line
        if line.strip():
            notice = json.loads(line)
            notices[notice["disruption_id"], notice["passenger_id"]] += 1
    disruptions: list[FlightDelayed | FlightCancelled] = []
    for _, data in await stream_messages(bus, FlightDelayed):
        disruptions.append(msgspec.json.decode(data, type=FlightDelayed))
    for _, data in await stream_messages(bus, FlightCancelled):
        disruptions.append(msgspec.json.decode(data, type=FlightCancelled))
    cancelled = {u.flight_id for u in status_feed(day) if u.status == "cancelled"}
    async with open_store(str(tmp / "bookings.sqlite3")) as store:
        audit = await store.audit(cancelled)
    return DayOutcome(
        assessed=assessed,
        affected=sum(assessed.values()),
        notices=notices,
        decisions=sum(
            len(msgspec.json.decode(data, type=RebookGroup).decisions)
            for _, data in await stream_messages(bus, RebookGroup)
        ),
        rejected=len(await stream_messages(bus, RebookRejected)),
        seat_conflicts=audit.seat_conflicts,
        stranded=audit.stranded_bookings,
        disruptions=disruptions,
    )


def expected_status_disruptions(updates: list[FlightStatusUpdated]) -> tuple[set[str], dict[str, list[int]]]:
    """The day's ground truth that does not depend on timing: the cancelled flights, and per flight
    the delays (minutes) the monitor must report as long delays, from the feed in its order."""
    seq: dict[str, int] = defaultdict(int)
    cancelled: set[str] = set()
    reported: dict[str, int] = defaultdict(int)
    long_delays: dict[str, list[int]] = defaultdict(list)
    for u in updates:
        if u.seq <= seq[u.flight_id] or u.flight_id in cancelled:
            continue
        seq[u.flight_id] = u.seq
        if u.status == "cancelled":
            cancelled.add(u.flight_id)
            continue
        if u.estimated_departure is None or u.status in ("departed", "arrived"):
            continue
        delay = max(0, (u.estimated_departure - u.scheduled_departure) // 60)
        if delay >= _THRESHOLD and (reported[u.flight_id] == 0 or delay >= reported[u.flight_id] + _AGAIN):
            reported[u.flight_id] = delay
            long_delays[u.flight_id].append(delay)
    return cancelled, dict(long_delays)


def check_disruptions(found: list[FlightDelayed | FlightCancelled], day: AirlineDay) -> None:
    """Every disruption announced once, none missed: against the feed's ground truth."""
    ids = Counter(d.disruption_id for d in found)
    assert max(ids.values(), default=1) == 1, f"announced twice: {[i for i, n in ids.items() if n > 1]}"
    cancelled, long_delays = expected_status_disruptions(status_feed(day))
    announced_cancel = Counter(
        d.flight_id for d in found if isinstance(d, FlightCancelled) and not d.bookings
    )  # not the ones for a booking moved onto a cancelled flight
    assert set(announced_cancel) == cancelled
    assert max(announced_cancel.values(), default=1) == 1
    announced_long: dict[str, list[int]] = defaultdict(list)
    missed: dict[str, Counter[str]] = defaultdict(Counter)
    for d in found:
        if isinstance(d, FlightDelayed):
            if d.long_delay:
                announced_long[d.flight_id].append(d.delay_minutes)
            missed[d.flight_id].update(d.missed_connections)
    assert {f: sorted(v) for f, v in announced_long.items()} == {f: sorted(v) for f, v in long_delays.items()}
    for flight, onward in missed.items():  # each broken connection reported once
        assert max(onward.values(), default=1) == 1, f"{flight}: {onward}"


def the_day(flights: int = 40, passengers: int = 3000, seed: int = 7) -> tuple[AirlineDay, int]:
    day = generate(flights, passengers, seed)
    return day, len(status_feed(day))


class AgentRun:
    """``busagents run NAME --nats URL`` as a child process (one replica), its output in ``log``."""

    def __init__(self, name: str, url: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.url = url
        self.log = log
        self._terminated = False
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "busagents", "--log-level", "INFO", "run", name, "--nats", url],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def instance(self) -> str:
        """How its heartbeats name it (``host:pid``)."""
        return f"{socket.gethostname()}:{self.process.pid}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def terminate(self) -> None:
        """Ask it to drain and stop (once: a second SIGTERM would cut the drain short)."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        self.terminate()
        try:
            return int(self.process.wait(60))
        except subprocess.TimeoutExpired:
            self.process.kill()
            return int(self.process.wait())


async def wait_for_instances(bus: Bus, instances: dict[str, set[str]], timeout: float) -> None:
    """Wait until every instance (``host:pid``) of every agent (name -> instances) sent a heartbeat."""
    missing = {(agent, i) for agent, found in instances.items() for i in found}
    done = asyncio.get_running_loop().create_future()

    async def on_beat(msg: nats.aio.msg.Msg) -> None:
        missing.discard((msg.subject.rsplit(".", 1)[-1], json.loads(msg.data).get("instance")))
        if not missing and not done.done():
            done.set_result(None)

    sub = await bus.nc.subscribe("busagents.stats.*", cb=on_beat)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        raise AssertionError(f"no heartbeat within {timeout}s from {sorted(missing)}") from None
    finally:
        await sub.unsubscribe()


# A cluster's listings (STREAM.LIST, CONSUMER.LIST) leave out, after a few seconds, what a busy or
# electing node did not answer: on a cluster, ask each stream and consumer by name instead.


async def wait_for_stored(bus: Bus, stream: str, stored: int, timeout: float) -> None:
    """Wait until ``stream`` holds ``stored`` messages (asked by name: fit for a cluster)."""
    deadline = asyncio.get_running_loop().time() + timeout
    held: int | str = 0
    while True:
        try:
            held = int((await bus.js.stream_info(stream)).state.messages)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            held = repr(exc)
        if isinstance(held, int) and held >= stored:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{stream}: {stored} messages not stored within {timeout}s: {held}")
        await asyncio.sleep(0.1)


async def durable_consumers(bus: Bus) -> dict[str, list[str]]:
    """The durable consumers of every ``BA_`` stream (from the cluster's assignments: the NAMES requests)."""
    found: dict[str, list[str]] = {}
    for stream in await _names(bus, "$JS.API.STREAM.NAMES", "streams"):
        if stream.startswith("BA_"):
            found[stream] = []
            for name in await _names(bus, f"$JS.API.CONSUMER.NAMES.{stream}", "consumers"):
                if (await bus.js.consumer_info(stream, name)).config.durable_name:
                    found[stream].append(name)
    return found


async def _names(bus: Bus, subject: str, key: str) -> list[str]:
    reply = json.loads((await bus.nc.request(subject, b"", timeout=5)).data)
    assert "error" not in reply and reply["total"] <= reply["limit"], f"{subject}: {reply}"
    return sorted(reply[key] or [])


async def settle_consumers(bus: Bus, consumers: dict[str, list[str]], updates: int, timeout: float) -> None:
    """:func:`settle` for a cluster: the feed and each of ``consumers`` (stream -> names) asked by name."""
    await wait_for_stored(bus, f"BA_{contract_info(FlightStatusUpdated).name}", updates, timeout)

    async def busy_now() -> list[str]:
        busy = []
        for stream, names in consumers.items():
            for name in names:
                try:
                    c = await bus.js.consumer_info(stream, name)
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    busy.append(f"{stream}/{name}: {exc!r}")
                    continue
                if c.num_pending or c.num_ack_pending:
                    busy.append(f"{stream}/{name}: {c.num_pending} pending, {c.num_ack_pending} ack")
        return busy

    await _until_quiet(busy_now, timeout)
