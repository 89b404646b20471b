"""A shadow reasoner beside the live one for a day: it decides every case, sends nothing, and is compared."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from busagents_flight.context import ContextAgent
from busagents_flight.data import AirlineDay, generate
from busagents_flight.feed import publish_feed, status_feed
from busagents_flight.monitor import FlightMonitor
from busagents_flight.notifier import Notifier, OutboxChannel
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.rebooker import Rebooker
from busagents_flight.settings import FlightSettings
from busagents_flight.store import SqliteStore
from busagents_travel import DisruptionAssessed, PassengerNotified, RebookGroup
from nats.aio.msg import Msg

from busagents import Agent, Bus, ConfigError, Context, NatsServer, on
from busagents.dryrun import DRY_SUBJECT, read_records
from busagents.durable import stream_name
from busagents.envelope import SENDER
from busagents.llm.testing import MessagesServer, RecordedRequest, Reply, tool_use
from busagents.observe import Catalog
from busagents.plugins import available_contracts
from busagents.shadow import compare, shadow_of
from busagents.swarm.config import SwarmConfig
from busagents.swarm.supervisor import Supervisor
from busagents.testing import delete_streams, run_agents

from .drain_agent import Job, child_env
from .test_flight_llm_reasoner import _RANK, choice_for, reasoner_for

DAY_ARGS = (24, 1500, 9)


def later_model(request: RecordedRequest) -> Reply:
    """A model that puts a lone traveller on the last option offered, in another cabin than booked
    where one has room; everyone else as the policy would."""
    case = json.loads(request.messages[2]["content"][0]["content"])
    if len(case["passengers"]) == 1:
        for option in case["options"][::-1]:
            for cabin in sorted(_RANK, key=lambda c: c == case["booked_cabin"]):
                free = [f["free_seats"].get(cabin, []) for f in option["flights"]]
                if all(free):
                    choice = {
                        "booking_id": case["booking_id"],
                        "action": "rebook",
                        "flights": [f["flight_id"] for f in option["flights"]],
                        "cabin": cabin,
                        "seats": [[seats[0].split()[0]] for seats in free],
                        "rationale": "We found you another seat.",
                    }
                    return tool_use("decide", choice)
    return tool_use("decide", choice_for(case))


class _Changed:
    """Called by the callbacks that change what a test waits for; :meth:`until` checks again after each."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def __call__(self) -> None:
        self._event.set()

    async def until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    await self._event.wait()
                    self._event.clear()
        except TimeoutError:
            raise AssertionError(f"not within {timeout}s: {what}") from None


async def _until_settled(bus: Bus, agent: Agent, timeout: float) -> None:
    """Until none of ``agent``'s durable consumers has a message pending or unacknowledged."""
    durable = [h.contract for h in type(agent).handlers.values() if h.durable]
    streams = [stream_name(info, info.durability) for info in durable if info.durability is not None]
    assert streams
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        infos = [await bus.js.consumer_info(stream, agent.name) for stream in streams]
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
            return
        if loop.time() > deadline:
            raise AssertionError(f"{agent.name} still busy after {timeout}s")
        await asyncio.sleep(0.05)


async def play_day(url: str, day: AirlineDay, tmp: Path, shadow: Agent | None = None) -> list[tuple[str, ...]]:
    """The day with the live agents (offline reasoner), and ``shadow`` on a dry-run bus; the outbox's notices.

    On a connection of its own: a bus remembers the key-value buckets it opened (deleted between days)."""
    bus = await Bus.connect(url, name="day")
    try:
        return await _play(bus, day, tmp, shadow)
    finally:
        await bus.close()


async def _play(bus: Bus, day: AirlineDay, tmp: Path, shadow: Agent | None) -> list[tuple[str, ...]]:
    feed = status_feed(day)
    monitor = FlightMonitor()
    outbox = tmp / "outbox.jsonl"
    live = [
        ContextAgent(day),
        monitor,
        ReasonerAgent("offline"),
        Rebooker(SqliteStore(tmp / "b.sqlite3"), day, load=True),
    ]
    affected: list[int] = []
    notified: set[tuple[str, str]] = set()
    changed = _Changed()

    async def on_assessed(msg: Msg) -> None:
        affected.append(msgspec.json.decode(msg.data, type=DisruptionAssessed).affected_passengers)
        changed()

    async def on_notified(msg: Msg) -> None:
        n = msgspec.json.decode(msg.data, type=PassengerNotified)
        notified.add((n.decision_id, n.passenger_id))
        changed()

    subs = [await bus.nc.subscribe("travel.disruption.assessed.*", cb=on_assessed)]
    subs.append(await bus.nc.subscribe("travel.passenger.notified.*", cb=on_notified))
    dry = Bus(bus.nc, dry_run=True)
    async with run_agents(bus, *live, Notifier(OutboxChannel(outbox))):
        async with run_agents(dry, *([shadow] if shadow else [])):
            await publish_feed(bus, feed)
            await monitor.wait_handled(len(feed), 60)
            await changed.until(
                lambda: len(affected) >= monitor.disruptions and len(notified) >= sum(affected), 60, "every notice"
            )
            if shadow is not None:  # the shadow has handled everything its consumers were given
                await _until_settled(bus, shadow, 60)
    for sub in subs:
        await sub.unsubscribe()
    lines = [json.loads(line) for line in outbox.read_text().splitlines()]
    return sorted((n["passenger_id"], n["booking_id"], n["subject"], n["text"]) for n in lines)


async def test_a_shadow_reasoner_decides_every_case_beside_the_live_one_and_sends_nothing(
    bus: Bus, nats_server: NatsServer, messages_server: MessagesServer, tmp_path: Path
) -> None:
    day = generate(*DAY_ARGS)
    (tmp_path / "alone").mkdir()
    alone = await play_day(nats_server.url, day, tmp_path / "alone")
    await delete_streams(bus)

    messages_server.responder = later_model
    shadow = shadow_of(ReasonerAgent)(reasoner_for(messages_server))
    sent_by_shadow: list[str] = []

    async def spy(msg: Msg) -> None:
        if (msg.headers or {}).get(SENDER, "").endswith("-shadow") and not msg.subject.startswith("busagents.dryrun."):
            sent_by_shadow.append(msg.subject)

    spying = await bus.nc.subscribe(">", cb=spy)
    (tmp_path / "shadowed").mkdir()
    shadowed = await play_day(nats_server.url, day, tmp_path / "shadowed", shadow)
    await bus.nc.flush()
    await spying.unsubscribe()

    assert alone and shadowed == alone  # the live outcome is unchanged: the same notices
    assert shadow.name == "flight-reasoner-shadow"
    # nothing of the shadow's was sent: it only asked the context agent (asking is not acting)
    assert sent_by_shadow and all(s.startswith("travel.context.") for s in sent_by_shadow), sent_by_shadow
    catalog = Catalog(available_contracts()[0])
    records = [r.seen for r in await read_records(bus, catalog)]
    assert {r.sender for r in records} == {"flight-reasoner-shadow"}
    live_groups = await _stream_bodies(bus, "BA_RebookGroup", RebookGroup)
    live_decided = {d.booking_id for g in live_groups for d in g.decisions}
    shadow_decided = {d["booking_id"] for r in records if r.contract == "RebookGroup" for d in r.body["decisions"]}
    assert live_decided and shadow_decided == live_decided  # a decision for every case

    [report] = await compare(bus, catalog)
    summary = report.summary()
    assert summary["cases"] == len({r.causation for r in records})
    # the model put lone travellers on another flight or cabin where it could: those decisions differ
    differing = [d for c in report.cases for d in c.differences()]
    lone = {b.booking_id for b in day.bookings if len(b.passengers) == 1} & live_decided
    assert differing and {d["decision"] for d in differing} <= lone
    assert all(
        (d["shadow"]["flights"], d["shadow"]["cabin"]) != (d["live"]["flights"], d["live"]["cabin"]) for d in differing
    )
    assert summary["decisions"] == len(live_decided) + summary["cases"]  # and a DisruptionAssessed per case
    assert summary["agreement"] == round(1 - len(differing) / summary["decisions"], 4)
    assert summary["cases"] > 1 and summary["agreeing_cases"] < summary["cases"]
    assert summary["shadow_side"]["tokens"] > 0  # as its outputs' Ba-Llm marks say
    assert summary["live"]["tokens"] == 0  # the offline policy
    assert summary["live"]["median_latency_seconds"] > 0 and summary["shadow_side"]["median_latency_seconds"] > 0

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "shadow", "report", "--nats", nats_server.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, err.decode()
    assert f"agreement: {summary['agreement']:.1%} of {summary['decisions']} decisions" in text
    assert "flight-reasoner (live) vs flight-reasoner-shadow" in text
    for d in differing:  # each differing decision, side by side
        assert f"live:   {json.dumps(d['live'])}" in text and f"shadow: {json.dumps(d['shadow'])}" in text


async def _stream_bodies(bus: Bus, stream: str, cls: type[RebookGroup]) -> list[RebookGroup]:
    info = await bus.js.stream_info(stream)
    return [
        msgspec.json.decode((await bus.js.get_msg(stream, seq=seq)).data or b"", type=cls)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def test_shadow_true_in_a_swarm_runs_the_agent_as_its_shadow_and_records_what_it_would_send(
    bus: Bus, nats_server: NatsServer
) -> None:
    env = child_env()
    config = SwarmConfig.model_validate(
        {
            "agents": {
                "slow": {"agent": "drain_agent:Slow", "env": {"PYTHONPATH": env["PYTHONPATH"]}},
                "slow-trial": {"agent": "drain_agent:Slow", "shadow": True, "env": {"PYTHONPATH": env["PYTHONPATH"]}},
            }
        }
    )
    heard: dict[str, list[Msg]] = {"live": [], "records": []}
    changed = _Changed()

    async def live(msg: Msg) -> None:
        heard["live"].append(msg)
        changed()

    async def recorded(msg: Msg) -> None:
        heard["records"].append(msg)
        changed()

    beats = await bus.nc.subscribe("busagents.stats.*")
    await bus.nc.subscribe("test.drain.done", cb=live)
    await bus.nc.subscribe("busagents.dryrun.>", cb=recorded)
    supervisor = Supervisor(config, nats_server.url, on_event=lambda _: None, stop_timeout=20)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    try:
        names: set[str] = set()
        while names != {"slow", "slow-shadow"}:  # both serve: the live agent and its shadow
            names.add((await beats.next_msg(timeout=30)).subject.rsplit(".", 1)[1])
        await bus.publish(Job(n=7))
        await changed.until(lambda: len(heard["live"]) >= 1 and len(heard["records"]) >= 2, 30, "both handled the job")
    finally:
        stop.set()
        await asyncio.wait_for(running, 40)
    # the shadow saw the job too (its own queue group) and sent nothing: its Started and Done are records
    assert [m.subject for m in heard["records"]] == ["busagents.dryrun.slow-shadow"] * 2
    assert sorted(m.headers[DRY_SUBJECT] for m in heard["records"] if m.headers) == [
        "test.drain.done",
        "test.drain.started",
    ]
    assert [(m.headers or {}).get(SENDER) for m in heard["live"]] == ["slow"]


async def test_a_dry_run_gives_the_rebooker_and_the_notifier_scratch_copies_of_store_and_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    day = generate(*DAY_ARGS)
    live_store, live_outbox = tmp_path / "bookings.sqlite3", tmp_path / "outbox.jsonl"
    async with SqliteStore(live_store) as store:
        await store.load(day.bookings)
    live_outbox.write_text('{"notice": "already sent"}\n')
    monkeypatch.setenv("BUSAGENTS_FLIGHT_STORE", str(live_store))
    monkeypatch.setenv("BUSAGENTS_FLIGHT_OUTBOX", str(live_outbox))
    monkeypatch.setenv("BUSAGENTS_DRY_RUN", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    settings = FlightSettings()
    assert Path(settings.store).parent == Path(settings.outbox).parent != tmp_path
    assert (FlightSettings().store, FlightSettings().outbox) == (settings.store, settings.outbox)  # once a process
    rebooker = Rebooker(day=day)  # as busagents run flight-rebooker --dry-run makes it
    async with rebooker.store as scratch:
        assert len(await scratch.bookings()) == len(day.bookings)
        await scratch.load(day.bookings[:1])  # the scratch store changes...
    async with SqliteStore(live_store) as store:
        assert len(await store.bookings()) == len(day.bookings)  # ...the live one does not
    _check_outbox_copy(Path(settings.outbox), live_outbox)
    monkeypatch.setenv("BUSAGENTS_FLIGHT_STORE", "postgresql://db/bookings")
    with pytest.raises(ConfigError, match="a dry run needs a SQLite booking store"):
        FlightSettings()


def _check_outbox_copy(scratch: Path, live: Path) -> None:
    """The scratch outbox starts as the live one's copy (already sent: not again); what it gets stays there."""
    assert scratch.read_text() == live.read_text()
    with scratch.open("a") as out:
        out.write('{"notice": "dry run"}\n')
    assert live.read_text() == '{"notice": "already sent"}\n'


def test_swarm_check_expects_a_shadow_entry_named_after_the_shadow_and_not_as_a_second_singleton() -> None:
    class Once(Agent):
        name = "once"
        singleton = True

        @on(Job)
        async def work(self, job: Job, ctx: Context) -> None:
            pass

    def check(entries: dict[str, dict[str, object]]) -> list[str]:
        config = SwarmConfig.model_validate({"agents": entries})
        return [str(p) for p in config.check({key: Once for key in entries})]

    assert check({"once": {}, "once-shadow": {"shadow": True}}) == []
    [warning] = check({"once": {}, "trial": {"shadow": True}})
    assert warning.startswith("warning: agents.trial runs agent 'once-shadow'")
    assert "name the table [agents.once-shadow]" in warning
    # a second live instance still is an error
    [error] = [p for p in check({"once": {}, "again": {"agent": "once"}}) if p.startswith("error")]
    assert error.startswith("error: agents ['once', 'again'] all run")


async def test_a_dry_run_on_a_server_without_jetstream_says_it_needs_it() -> None:
    with NatsServer(jetstream=False) as plain:
        async with await Bus.connect(plain.url) as connected:
            dry = Bus(connected.nc, dry_run=True)
            with pytest.raises(ConfigError, match="a dry run records what it would send in the JetStream stream"):
                async with run_agents(dry, shadow_of(ReasonerAgent)("offline")):
                    pass
