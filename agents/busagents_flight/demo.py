"""``busagents demo``: the flight assistant on an embedded nats-server, end to end.

It generates the seeded airline day, finds NATS as every busagents command does
(``--nats``, ``BUSAGENTS_NATS_URL``, the busagents server, else a private embedded
nats-server on a free loopback port; see :mod:`busagents.locate`), runs the five agents
in this process, plays the status feed, shows what happens as it happens, and stops
when every disruption has been assessed and every affected passenger notified.
Ctrl-C (SIGINT or SIGTERM) stops it early: the agents drain, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgspec
from busagents_travel import (
    BookingsChanged,
    DisruptionAssessed,
    FlightCancelled,
    FlightDelayed,
    FlightStatusUpdated,
    PassengerNotified,
    RebookRejected,
)
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from busagents import Agent, Bus, NatsServer, Worker
from busagents.cli.trace import render_tree
from busagents.contract import contract_info
from busagents.conversation import causal_tree, read_conversation
from busagents.convlog import conversation_log
from busagents.dlq import DLQ_REASON
from busagents.durable import stream_name
from busagents.envelope import CONVERSATION_ID, SENT_AT
from busagents.locate import use_nats
from busagents.observe import Catalog
from busagents.process import die_with_parent
from busagents.settings import Settings
from busagents.subjects import DLQ_SUBJECTS
from busagents.worker import collect_young_less_often

from .chat import ChatGateway, affected_passengers
from .concierge import ConciergeAgent
from .context import ContextAgent
from .data import AirlineDay, generate
from .feed import publish_feed, status_feed
from .monitor import FlightMonitor
from .notifier import Notifier, OutboxChannel
from .reasoner import ReasonerAgent
from .rebooker import Rebooker
from .settings import FlightSettings
from .store import Audit, BookingStore, open_store

__all__ = ["DemoReport", "flight_demo", "run_demo"]


class DemoReport(msgspec.Struct, kw_only=True):
    """The summary of a run (``--report`` writes it as JSON)."""

    disruptions: int
    affected: int
    rebooked: int
    refunded: int
    kept: int
    notified: int
    dead_lettered: int
    seat_conflicts: int
    stranded: int  # active bookings still holding a leg on a cancelled flight (should be 0)
    redecided: int
    interrupted: bool = False  # stopped by SIGINT/SIGTERM before the day settled (then drained)
    #: What was still unmet when the run stopped before the day settled ("" when it settled).
    unsettled: str = ""
    #: Disruptions and assessments that reached the demo twice (a retried publish, a redelivered
    #: handler), counted once.
    repeated: dict[str, int] = {}
    latency_ms: dict[str, float]
    flights: int
    passengers: int
    seed: int
    status_updates: int
    messages: int  # travel.> messages seen on the bus (status feed, events, commands, query requests)
    wall_seconds: float  # everything: generating the day, loading the store, the run, the audit
    run_seconds: float  # first status update published -> last passenger notified
    #: When the run began (Unix time, the first status update's publish), to line it up with traces and metrics.
    run_started_at: float = 0.0
    msgs_per_second: float  # messages / run_seconds
    #: A few conversations that rebooked or refunded someone, the smallest first: ``busagents trace ID``.
    conversations: list[str] = []
    #: The LLM reasoner's model use (in-process runs): requests, input_tokens, cache_read_tokens,
    #: output_tokens, estimated_cost_usd...; per disruption in ``llm_by_disruption`` (the costliest 10).
    llm: dict[str, float] = {}
    affected_bookings: int = 0
    llm_by_disruption: dict[str, dict[str, float]] = {}


@dataclass
class _Tally:
    """Counts what goes over the bus, from the demo's own subscriptions."""

    console: Console | None
    live: bool = False  # lines go to the live view's recent-events panel instead of the console
    verbose_notices: int = 3
    samples: list[str] = field(default_factory=list)  # a few notifications, shown in full at the end
    max_lines: int = 60  # printed event lines when not live; the rest are only counted
    lines: int = 0
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=14))
    feed_total: int = 0
    feed_published: int = 0
    sim_clock: int = 0
    started: float = field(default_factory=time.monotonic)
    started_at: float = 0.0  # the same moment as `started`, in Unix time
    cancelled: int = 0
    messages: int = 0
    disruptions: int = 0
    assessed: int = 0
    affected: int = 0
    affected_bookings: int = 0
    rebooked: int = 0
    refunded: int = 0
    kept: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    notified: set[tuple[str, str]] = field(default_factory=set)
    #: A disruption or assessment published twice (a publish retried after a lost ack, a redelivered
    #: handler: JetStream stores one) reaches the demo's core subscriptions twice: counted once, by id.
    disrupted_at: dict[str, int] = field(default_factory=dict)  # each disruption seen -> when it was sent
    affected_by: dict[str, int] = field(default_factory=dict)  # each disruption assessed -> its passengers
    repeated: dict[str, int] = field(default_factory=lambda: {"disruptions": 0, "assessments": 0})  # seen again
    latencies_ms: list[float] = field(default_factory=list)
    conversations: dict[str, int] = field(default_factory=dict)  # id -> passengers rebooked or refunded in it
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def say(self, text: str) -> None:
        if self.live:
            self.recent.append(text)
        elif self.console is not None:
            self.lines += 1
            if self.lines <= self.max_lines:
                self.console.print(text, highlight=False)
            elif self.lines == self.max_lines + 1:
                self.console.print("  ... (further events counted, not printed; see the summary)")

    def board(self) -> RenderableType:
        """The live view: the day so far, as counts, rates and latencies, and the latest events."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        recent_latencies = self.latencies_ms[-5000:]
        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold")
        table.add_column()
        clock = _hm(self.sim_clock) if self.sim_clock else "--:--"
        table.add_row("simulated clock", f"{clock}  ({self.feed_published}/{self.feed_total} status updates)")
        table.add_row("flights disrupted", f"{self.disruptions} ({self.cancelled} cancelled)")
        table.add_row("passengers affected", str(self.affected))
        table.add_row("rebooked", f"[green]{self.rebooked}[/]")
        table.add_row("refunded", f"[magenta]{self.refunded}[/]")
        table.add_row("kept (delay only)", str(self.kept))
        table.add_row("notified", f"[cyan]{len(self.notified)}[/] / {self.affected}")
        table.add_row("re-decided (seat races)", str(self.rejected))
        table.add_row("dead letters", f"[red]{self.dead_lettered}[/]" if self.dead_lettered else "0")
        table.add_row("messages/s", f"{self.messages / elapsed:,.0f}  ({self.messages:,} in {elapsed:.1f}s)")
        table.add_row(
            "latency p50 / p99",
            f"{_percentile(recent_latencies, 50):,.0f} / {_percentile(recent_latencies, 99):,.0f} ms "
            "(disruption -> notified)",
        )
        events = Text.from_markup("\n".join(self.recent) or "waiting for the first disruption ...")
        return Group(
            Panel(table, title="busagents flight assistant", border_style="blue"),
            Panel(events, title="latest events", border_style="dim"),
        )


class _Notified(msgspec.Struct):
    """What the tally needs of a PassengerNotified (skips decoding the text)."""

    disruption_id: str
    passenger_id: str
    action: str


_decode_notified = msgspec.json.Decoder(PassengerNotified).decode


def _sent_at(msg: Msg) -> int:
    return int((msg.headers or {}).get(SENT_AT, "0"))


def _on_travel(t: _Tally, _: None, msg: Msg) -> None:
    t.messages += 1


def _seen(t: _Tally, disruption_id: str, msg: Msg) -> bool:
    """Record a disruption; False when it was seen before (a second copy)."""
    if disruption_id in t.disrupted_at:
        t.repeated["disruptions"] += 1
        return False
    t.disrupted_at[disruption_id] = _sent_at(msg)
    t.disruptions += 1
    return True


def _on_delayed(t: _Tally, e: FlightDelayed, msg: Msg) -> None:
    if not _seen(t, e.disruption_id, msg):
        return
    why = []
    if e.long_delay:
        why.append("long delay")
    if e.missed_connections:
        why.append(f"breaks connections to {', '.join(e.missed_connections)}")
    t.say(f"[yellow]DELAYED[/]   {e.number} {e.origin}->{e.destination} +{e.delay_minutes} min ({'; '.join(why)})")
    t.changed.set()


def _on_cancelled(t: _Tally, e: FlightCancelled, msg: Msg) -> None:
    if not _seen(t, e.disruption_id, msg):
        return
    t.cancelled += 1
    t.say(f"[red]CANCELLED[/] {e.number} {e.origin}->{e.destination} ({e.reason})")
    t.changed.set()


def _on_assessed(t: _Tally, e: DisruptionAssessed, msg: Msg) -> None:
    if e.disruption_id in t.affected_by:
        t.repeated["assessments"] += 1
        return
    t.affected_by[e.disruption_id] = e.affected_passengers
    t.assessed += 1
    t.affected += e.affected_passengers
    t.affected_bookings += e.affected_bookings
    t.say(
        f"  assessed  {e.disruption_id}: {e.affected_passengers} passengers in {e.affected_bookings} bookings affected"
    )
    t.changed.set()


def _on_changed(t: _Tally, e: BookingsChanged, msg: Msg) -> None:
    for change in e.changes:
        n = len(change.passengers)
        if change.action == "rebook":
            t.rebooked += n
            route = " + ".join(f"{leg.number} seats {','.join(leg.seats)}" for leg in change.new_legs)
            t.say(f"  [green]rebooked[/]  {change.booking_id} ({n} pax) on {route}")
        elif change.action == "refund":
            t.refunded += n
            t.say(f"  [magenta]refunded[/]  {change.booking_id} ({n} pax)")
        else:
            t.kept += n


def _on_rejected(t: _Tally, e: RebookRejected, msg: Msg) -> None:
    t.rejected += 1
    t.say(f"  [red]rejected[/]  {e.booking_id}: {e.reason} {e.detail} -> re-deciding")


def _on_notified(t: _Tally, e: _Notified, msg: Msg) -> None:
    conversation = (msg.headers or {}).get(CONVERSATION_ID)
    if conversation and e.action != "keep":
        t.conversations[conversation] = t.conversations.get(conversation, 0) + 1
    key = (e.disruption_id, e.passenger_id)
    if key not in t.notified:
        t.notified.add(key)
        start = t.disrupted_at.get(e.disruption_id)
        if start:
            t.latencies_ms.append((_sent_at(msg) - start) / 1e6)
    if len(t.samples) < t.verbose_notices and e.action != "keep":
        full = _decode_notified(msg.data)
        t.samples.append(f"[cyan]{full.passenger_id}[/] ({full.channel}): {full.text}")
    t.say(f"  [cyan]notified[/]  {e.passenger_id} ({e.action})")
    t.changed.set()


def _on_dead_letter(t: _Tally, _: None, msg: Msg) -> None:
    t.dead_lettered += 1
    reason = (msg.headers or {}).get(DLQ_REASON, "")
    t.say(f"[bold red]DEAD LETTER[/] {msg.subject}: {reason}")
    t.changed.set()


#: What the demo listens to: (subject, the type its messages are decoded as or None, what it means for the tally).
_LISTENS: tuple[tuple[str, type[Any] | None, Callable[[_Tally, Any, Msg], None]], ...] = (
    ("travel.>", None, _on_travel),
    (contract_info(FlightDelayed).subscribe_subject, FlightDelayed, _on_delayed),
    (contract_info(FlightCancelled).subscribe_subject, FlightCancelled, _on_cancelled),
    (contract_info(DisruptionAssessed).subscribe_subject, DisruptionAssessed, _on_assessed),
    (contract_info(BookingsChanged).subscribe_subject, BookingsChanged, _on_changed),
    (contract_info(RebookRejected).subscribe_subject, RebookRejected, _on_rejected),
    (contract_info(PassengerNotified).subscribe_subject, _Notified, _on_notified),
    (DLQ_SUBJECTS, None, _on_dead_letter),
)


async def _subscribe(bus: Bus, tally: _Tally) -> list[Subscription]:
    """The demo's own subscriptions (:data:`_LISTENS`), each telling the tally what it saw."""

    def listener(
        decode: Callable[[bytes], Any] | None, on_event: Callable[[_Tally, Any, Msg], None]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def cb(msg: Msg) -> None:
            on_event(tally, decode(msg.data) if decode else None, msg)

        return cb

    subs = [
        await bus.nc.subscribe(subject, cb=listener(msgspec.json.Decoder(cls).decode if cls else None, on_event))
        for subject, cls, on_event in _LISTENS
    ]
    await bus.nc.flush()
    return subs


async def _until(tally: _Tally, done: Callable[[], bool], timeout: float) -> None:
    async def wait() -> None:
        while not done():
            tally.changed.clear()
            await tally.changed.wait()

    await asyncio.wait_for(wait(), timeout)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 2)


async def run_demo(
    *,
    flights: int = 40,
    passengers: int = 3000,
    seed: int = 7,
    reasoner: str = "offline",
    store: str | None = None,
    outbox: str | None = None,
    day_seconds: float = 0.0,
    timeout: float = 600.0,
    console: Console | None = None,
    live: bool = False,
    processes: bool = False,
    nats_url: str | None = None,
    stop: asyncio.Event | None = None,
    chat_port: int | None = None,
) -> DemoReport:
    """Run the whole flight assistant once and return the summary.

    ``nats_url``: the NATS to run on (None: a private embedded nats-server, stopped at the end).
    ``stop``: set it to stop early (Ctrl-C): the agents drain, then the server stops; the report
    says ``interrupted``.

    ``day_seconds``: real seconds the simulated day's status feed takes (0: as fast as possible).
    ``live``: show the rich live view on ``console`` instead of printing each event.
    ``processes``: run the reasoner, rebooker and notifier as OS processes (``busagents run``),
    so they use other cores; the context agent and the monitor stay in this process.
    ``chat_port``: also serve the chat page (:class:`~busagents_flight.chat.ChatGateway`) on this
    loopback port (0: a free one) and, once the day has settled, keep running until ``stop`` is set.
    """
    started = time.monotonic()
    day = generate(flights, passengers, seed)
    feed = status_feed(day)
    span = feed[-1].observed_at - feed[0].observed_at if feed else 0
    speed = span / day_seconds if day_seconds > 0 and span > 0 else 0.0
    with tempfile.TemporaryDirectory(prefix="busagents-flight-") as tmp:
        store_location = store or str(Path(tmp) / "bookings.sqlite3")
        booking_store = open_store(store_location)
        outbox_path = str(outbox or Path(tmp) / "outbox.jsonl")
        monitor = FlightMonitor()
        agents = await _local_agents(day, monitor, booking_store, reasoner, outbox_path, processes=processes)
        child_env = {
            "BUSAGENTS_FLIGHT_FLIGHTS": str(flights),
            "BUSAGENTS_FLIGHT_PASSENGERS": str(passengers),
            "BUSAGENTS_FLIGHT_SEED": str(seed),
            "BUSAGENTS_FLIGHT_REASONER": reasoner,
            "BUSAGENTS_FLIGHT_STORE": store_location,
            "BUSAGENTS_FLIGHT_OUTBOX": outbox_path,
            "BUSAGENTS_HEARTBEAT_INTERVAL": "1",
        }
        tally = _Tally(console, live=live and console is not None, feed_total=len(feed))
        if console is not None:
            console.print(
                f"[bold]busagents flight assistant[/]: {len(day.flights)} flights, {day.passenger_count} passengers "
                f"in {len(day.bookings)} bookings, {len(feed)} status updates (seed {seed}), reasoner {reasoner!r}"
            )
        async with contextlib.AsyncExitStack() as stack:  # the server's start and stop wait off the loop
            url = nats_url or (await stack.enter_async_context(NatsServer())).url
            if nats_url is not None:  # a server that outlives the demo keeps the last run's day
                await _fresh_day(url, console)
            kids = stack.enter_context(_AgentProcesses(_CHILD_AGENTS if processes else (), url, child_env, tmp))
            bus = await Bus.connect(url, name="flight-demo")
            try:
                # BUSAGENTS_CONVERSATION_LOG=1 keeps the core messages too (the agent processes read it as well)
                worker = Worker(
                    agents, bus, drain_timeout=30, conversation_log=conversation_log(Settings()), freeze_gc=True
                )
                await worker.start()
                await kids.serving(bus, timeout)
                try:
                    async with _chat_page(bus, day, chat_port, console) as chatting:
                        run_seconds = await _play(bus, tally, monitor, feed, speed, timeout, stop)
                        interrupted = stop is not None and stop.is_set()
                        if chatting and stop is not None and not interrupted:
                            await _keep_chatting(console, stop)
                finally:
                    drained = await worker.drain()
                    drained = await kids.stop() and drained
                if not drained:
                    raise click.ClickException("the agents did not drain within 30s")
                if console is not None:
                    await _show_conversation(bus, tally, console)
                await booking_store.open()
                audit = await booking_store.audit(u.flight_id for u in feed if u.status == "cancelled")
                await booking_store.close()
            finally:
                await bus.close()
    wall = time.monotonic() - started
    if console is not None and tally.samples:
        console.rule("some of the messages sent to passengers")
        for sample in tally.samples:
            console.print(sample, highlight=False)
    report = _report(tally, audit, day, feed, seed=seed, wall=wall, run_seconds=run_seconds)
    report.interrupted = interrupted
    report.unsettled = _unsettled(tally, monitor) if interrupted else ""
    report.repeated = dict(tally.repeated)
    report.llm, report.llm_by_disruption = _llm_usage(agents)
    report.affected_bookings = tally.affected_bookings
    return report


def _llm_usage(agents: list[Agent]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """What the in-process reasoner's model use was, for the report (nothing for the offline policy)."""
    for agent in agents:  # duck-typed: busagents.llm (and anthropic) stay unimported for the offline policy
        reasoner = getattr(agent, "reasoner", None)
        usage = getattr(reasoner, "usage", None)
        if usage is not None and hasattr(usage, "report"):
            per: dict[str, Any] = getattr(reasoner, "by_disruption", {})
            costliest = sorted(per, key=lambda d: -per[d].cost)[:10]
            return usage.report(), {d: per[d].report() for d in costliest}
    return {}, {}


@contextlib.asynccontextmanager
async def _chat_page(bus: Bus, day: AirlineDay, port: int | None, console: Console | None) -> AsyncIterator[bool]:
    """The chat page beside the day when ``port`` is given (True), else nothing (False)."""
    if port is None:
        yield False
        return
    async with ChatGateway(bus, port=port, passengers=affected_passengers(day)) as gateway:
        who = f" (e.g. passenger {gateway.passengers[0][0]})" if gateway.passengers else ""
        line = f"chat with the assistant: {gateway.url}{who}"
        _say(console, f"[bold]{line}[/]")
        yield True


async def _keep_chatting(console: Console | None, stop: asyncio.Event) -> None:
    """After the day: the chat page stays up until Ctrl-C."""
    _say(console, "the day has settled; the chat page stays up until Ctrl-C")
    await stop.wait()


def _say(console: Console | None, line: str) -> None:
    """A line on the console (rich markup), or plain on stdout when the demo is quiet."""
    if console is None:
        click.echo(Text.from_markup(line).plain)
    else:
        console.print(line, highlight=False)


_FLIGHT_AGENTS: tuple[type[Agent], ...] = (
    ContextAgent,
    FlightMonitor,
    ReasonerAgent,
    Rebooker,
    Notifier,
    ConciergeAgent,
)


async def _fresh_day(url: str, console: Console | None) -> None:
    """Delete the flight app's streams and key-value buckets on ``url``: the context view would replay
    the last run's day, the monitor remember its disruptions, and JetStream drop its message ids."""
    infos = {contract_info(c) for cls in _FLIGHT_AGENTS for c in (*cls.consumes(), *cls.produces)}
    streams = {stream_name(i, i.durability) for i in infos if i.durability is not None}
    streams |= {f"KV_{bucket}" for cls in _FLIGHT_AGENTS for bucket in cls.state_buckets}
    bus = await Bus.connect(url, name="flight-demo-reset")
    try:
        existing = {info.config.name for info in await bus.js.streams_info()}
        for name in sorted(streams & existing):
            await bus.js.delete_stream(name)
    finally:
        await bus.close()
    if console is not None and streams & existing:
        console.print(f"a fresh day on {url}: deleted the last run's {', '.join(sorted(streams & existing))}")


async def _local_agents(
    day: AirlineDay, monitor: FlightMonitor, store: BookingStore, reasoner: str, outbox: str, *, processes: bool
) -> list[Agent]:
    """The agents of this process: all six, or the context agent and the monitor when the others
    run as processes (the store is then loaded here, for them)."""
    agents: list[Agent] = [ContextAgent(day), monitor]
    if processes:
        async with store:
            await store.load(day.bookings)
        return agents
    return [
        *agents,
        ReasonerAgent(reasoner),
        Rebooker(store, day, load=True),
        Notifier(OutboxChannel(outbox)),
        ConciergeAgent(),
    ]


def _report(
    tally: _Tally,
    audit: Audit,
    day: AirlineDay,
    feed: list[FlightStatusUpdated],
    *,
    seed: int,
    wall: float,
    run_seconds: float,
) -> DemoReport:
    return DemoReport(
        disruptions=tally.disruptions,
        affected=tally.affected,
        rebooked=tally.rebooked,
        refunded=tally.refunded,
        kept=tally.kept,
        notified=len(tally.notified),
        dead_lettered=tally.dead_lettered,
        seat_conflicts=audit.seat_conflicts,
        stranded=audit.stranded_bookings,
        redecided=tally.rejected,
        latency_ms={"p50": _percentile(tally.latencies_ms, 50), "p99": _percentile(tally.latencies_ms, 99)},
        flights=len(day.flights),
        passengers=day.passenger_count,
        seed=seed,
        status_updates=len(feed),
        messages=tally.messages,
        wall_seconds=round(wall, 2),
        run_seconds=round(run_seconds, 2),
        run_started_at=round(tally.started_at, 3),
        msgs_per_second=round(tally.messages / run_seconds, 1) if run_seconds else 0.0,
        conversations=_traceable(tally),
    )


def _traceable(tally: _Tally) -> list[str]:
    """Three conversations that rebooked or refunded someone, the smallest first."""
    return sorted(tally.conversations, key=lambda c: (tally.conversations[c], c))[:3]


async def _show_conversation(bus: Bus, tally: _Tally, console: Console) -> None:
    """The causal tree of the smallest of them, as ``busagents trace`` prints it, while the server still runs."""
    picks = _traceable(tally)
    if not picks:
        return
    roots = causal_tree(await read_conversation(bus, picks[0], Catalog.installed()))
    console.rule(f"one conversation, as 'busagents trace {picks[0]}' shows it")
    console.print(render_tree(picks[0], roots, width=60, most=4))


async def _play(
    bus: Bus,
    tally: _Tally,
    monitor: FlightMonitor,
    feed: list[FlightStatusUpdated],
    speed: float,
    timeout: float,
    stop: asyncio.Event | None,
) -> float:
    """Play the status feed and wait until every disruption is assessed and every affected passenger
    notified (or ``stop`` is set), watching it all on the demo's subscriptions; the seconds it took."""
    subs = await _subscribe(bus, tally)
    board: contextlib.AbstractContextManager[object] = (
        Live(console=tally.console, get_renderable=tally.board, refresh_per_second=4)
        if tally.live
        else contextlib.nullcontext()
    )

    def progress(update: FlightStatusUpdated) -> None:
        tally.feed_published += 1
        tally.sim_clock = max(tally.sim_clock, update.observed_at)

    async def settle() -> None:
        await publish_feed(bus, feed, speed=speed, on_published=progress)
        try:
            await monitor.wait_handled(len(feed), timeout)
        except TimeoutError:
            raise TimeoutError(f"the monitor handled {monitor.updates} of {len(feed)} status updates") from None
        try:
            await _until(tally, lambda: not _unsettled(tally, monitor, count_only=True), timeout)
        except TimeoutError:
            raise TimeoutError(_unsettled(tally, monitor)) from None

    tally.started = run_started = time.monotonic()
    tally.started_at = time.time()
    try:
        board.__enter__()
        await _unless_stopped(settle(), stop)
        return time.monotonic() - run_started
    finally:
        board.__exit__(None, None, None)
        for sub in subs:
            await sub.unsubscribe()


def _unsettled(tally: _Tally, monitor: FlightMonitor, *, count_only: bool = False, most: int = 5) -> str:
    """What keeps the day from settling ("": nothing): every disruption the monitor announced seen,
    every one seen assessed, every affected passenger notified. With the counts and the first
    ``most`` ids missing on each side, unless ``count_only`` (the check made on every event)."""
    unmet = []
    if tally.disruptions < monitor.disruptions:
        unmet.append(f"the monitor announced {monitor.disruptions} disruptions, the demo saw {tally.disruptions}")
        if not count_only:
            unmet[-1] += ": not seen " + _first(monitor.announced - tally.disrupted_at.keys(), most)
    if tally.assessed < tally.disruptions:
        unmet.append(f"{tally.disruptions} disruptions seen, {tally.assessed} assessed")
        if not count_only:
            unmet[-1] += ": not assessed " + _first(tally.disrupted_at.keys() - tally.affected_by.keys(), most)
    if len(tally.notified) < tally.affected:
        unmet.append(f"{tally.affected} affected passengers, {len(tally.notified)} notified")
        if not count_only:
            notified: dict[str, int] = {}
            for disruption_id, _ in tally.notified:
                notified[disruption_id] = notified.get(disruption_id, 0) + 1
            short = {
                d: f"{d} ({notified.get(d, 0)} of {n})" for d, n in tally.affected_by.items() if notified.get(d, 0) < n
            }
            unmet[-1] += ": short on " + _first(short.keys(), most, short)
    if unmet and not count_only and any(tally.repeated.values()):
        unmet.append(f"seen twice and counted once: {tally.repeated}")
    return "; ".join(unmet)


def _first(ids: AbstractSet[str], most: int, shown: dict[str, str] | None = None) -> str:
    """The first ``most`` of ``ids`` in order, and how many more."""
    first = sorted(ids)[:most]
    more = f" and {len(ids) - len(first)} more" if len(ids) > len(first) else ""
    return ", ".join(shown[i] if shown else i for i in first) + more


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event | None) -> None:
    """Await ``work``, or cancel it once ``stop`` is set."""
    if stop is None:
        await work
        return
    async with asyncio.TaskGroup() as tasks:
        doing = tasks.create_task(work, name="demo:play")
        stopped = tasks.create_task(stop.wait(), name="demo:stop")
        await asyncio.wait([doing, stopped], return_when=asyncio.FIRST_COMPLETED)
        doing.cancel()
        stopped.cancel()


_CHILD_AGENTS = ("flight-reasoner", "flight-rebooker", "flight-notifier", "flight-concierge")


class _AgentProcesses:
    """Agents run as ``busagents run NAME`` child processes; stopped with SIGTERM (drain)."""

    def __init__(self, names: tuple[str, ...], url: str, env: dict[str, str], logs: str) -> None:
        self.names = names
        self.url = url
        self.env = {**os.environ, **env}
        self.logs = Path(logs)
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> _AgentProcesses:
        for name in self.names:
            log = self.logs / f"{name}-{len(self.children)}.log"
            with log.open("wb") as out:
                child = subprocess.Popen(
                    [sys.executable, "-m", "busagents", "run", name, "--nats", self.url],
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the demo only, which drains them in order
                    preexec_fn=die_with_parent(),  # gone with the demo, even if it is killed
                )
            self.children.append((name, child, log))
        return self

    async def serving(self, bus: Bus, timeout: float) -> None:
        """Wait until every child agent is subscribed (its first heartbeat)."""
        if not self.children:
            return
        try:
            await bus.wait_for_agents(self.names, timeout=timeout)
        except TimeoutError as exc:
            raise click.ClickException(f"{exc}\n{self._tails()}") from None

    async def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM (each drains); killed after ``timeout``. True when every one exited cleanly in time."""
        for _, child, _ in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        clean = True
        for _, child, _ in self.children:
            try:
                clean = await asyncio.to_thread(child.wait, max(0.1, deadline - time.monotonic())) == 0 and clean
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                clean = False
        return clean

    def _tails(self) -> str:
        return "\n".join(
            f"--- {name} (exit {child.poll()}):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            for name, child, log in self.children
        )

    def __exit__(self, *exc: object) -> None:
        for _, child, _ in self.children:
            if child.poll() is None:
                child.kill()
                child.wait()


async def _until_signalled(run: Callable[[asyncio.Event], Awaitable[DemoReport]]) -> DemoReport:
    """``run(stop)`` with SIGINT and SIGTERM setting ``stop``: Ctrl-C drains the agents instead of
    tearing the run down (the server and the agent processes have their own sessions)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _hm(t: int) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


@click.command("flight")
@click.option("--flights", type=click.IntRange(4, 20_000), default=None, help="Flights in the day (default 40).")
@click.option("--passengers", type=click.IntRange(1, 2_000_000), default=None, help="Passengers (default 3000).")
@click.option("--seed", type=int, default=None, help="Seed of the generated day (default 7).")
@click.option("--reasoner", default=None, help="Reasoner backend (default: offline).")
@click.option("--store", default=None, help="Booking store: SQLite path or postgresql:// DSN (default: a temp file).")
@click.option(
    "--day-seconds",
    type=click.FloatRange(0),
    default=8.0,
    show_default=True,
    help="Real seconds the simulated day takes (accelerated clock; 0: as fast as possible).",
)
@click.option("--outbox", default=None, help="Notification outbox file, JSON lines (default: a temp file).")
@click.option("--live/--no-live", default=None, help="Rich live view (default: when the output is a terminal).")
@click.option(
    "--processes/--in-process",
    default=False,
    show_default=True,
    help="Reasoner, rebooker and notifier as OS processes (busagents run), to use more cores.",
)
@click.option(
    "--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Write the summary as JSON."
)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up after this many seconds.")
@click.option(
    "--nats",
    default=None,
    help="NATS URL (else BUSAGENTS_NATS_URL, else the busagents server if running, else an embedded one).",
)
@click.option("--quiet", is_flag=True, help="Only the summary.")
@click.option("--chat", is_flag=True, help="Also serve the chat page and keep running after the day until Ctrl-C.")
@click.option(
    "--chat-port", type=click.IntRange(0, 65535), default=8350, show_default=True, help="Port of the chat page."
)
@click.help_option("-h", "--help")
def flight_demo(
    flights: int | None,
    passengers: int | None,
    seed: int | None,
    reasoner: str | None,
    store: str | None,
    day_seconds: float,
    outbox: str | None,
    live: bool | None,
    processes: bool,
    report_path: str | None,
    timeout: float,
    nats: str | None,
    quiet: bool,
    chat: bool,
    chat_port: int,
) -> None:
    """The flight assistant on an embedded NATS: status feed -> monitor -> reasoner -> rebooker -> notifier."""
    s = FlightSettings()
    console = Console()
    collect_young_less_often(Settings().gc_threshold)  # before the day is generated (see busagents run)
    try:
        with use_nats(nats, embed=True, say=lambda line: click.echo(line, err=True)) as url:
            report = asyncio.run(
                _until_signalled(
                    lambda stop: run_demo(
                        flights=flights or s.flights,
                        passengers=passengers or s.passengers,
                        seed=s.seed if seed is None else seed,
                        reasoner=reasoner or s.reasoner,
                        store=store,
                        outbox=outbox,
                        day_seconds=day_seconds,
                        timeout=timeout,
                        console=None if quiet else console,
                        live=console.is_terminal if live is None else live,
                        processes=processes,
                        nats_url=url,
                        chat_port=chat_port if chat else None,
                        stop=stop,
                    )
                )
            )
    except TimeoutError as exc:
        raise click.ClickException(f"the demo did not settle within {timeout}s: {exc}") from None
    summary = msgspec.to_builtins(report)
    console.rule("summary")
    for key in (
        "disruptions",
        "affected",
        "rebooked",
        "refunded",
        "kept",
        "notified",
        "dead_lettered",
        "seat_conflicts",
        "stranded",
        "redecided",
    ):
        console.print(f"{key:>16}: {summary[key]}")
    console.print(
        f"{'latency':>16}: p50 {report.latency_ms['p50']} ms, p99 {report.latency_ms['p99']} ms "
        "(disruption -> notified)"
    )
    console.print(
        f"{'throughput':>16}: {report.messages} messages in {report.run_seconds}s ({report.msgs_per_second}/s); "
        f"{report.wall_seconds}s in all"
    )
    if report.llm:
        u = report.llm
        console.print(
            f"{'llm':>16}: {u['requests']:.0f} requests, {u['input_tokens']:.0f} input + "
            f"{u['cache_read_tokens']:.0f} cache-read + {u['output_tokens']:.0f} output tokens, "
            f"about ${u['estimated_cost_usd']:.2f} (list prices)"
        )
    if report.conversations:
        console.print(
            f"{'conversations':>16}: {', '.join(report.conversations)} "
            "(busagents trace ID --nats URL, on a server that keeps them)"
        )
    if report_path:
        Path(report_path).write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"report written to {report_path}")
    if report.interrupted:  # what was in hand was finished: a clean stop, not a failed run
        console.print("interrupted before the day settled; every agent drained")
        if report.unsettled:
            console.print(f"unsettled: {report.unsettled}", highlight=False)
        return
    if report.notified != report.affected or report.dead_lettered or report.seat_conflicts:
        raise click.ClickException("the run did not reconcile: see the summary")
