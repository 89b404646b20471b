"""Durable delivery over a real nats-server: streams from declarations, acks, retries, dead letters, order."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections import defaultdict

import msgspec
import pytest

from busagents import Agent, Bus, Context, ContractError, Durability, PermanentError, Worker, command, event, on
from busagents.dlq import dead_letters
from busagents.durable import derived_id
from busagents.idempotency import Idempotency
from busagents.server import NatsServer
from busagents.testing import run_agents

from .fault_ledger import wait_settled

QUICK = Durability(ack_wait=2.0, max_deliver=3, backoff=(0.01, 0.02))


@command("test.durable.task", key="task_id", durable=QUICK)
class Task(msgspec.Struct):
    task_id: str
    fail_times: int = 0
    permanent: bool = False


@event("test.durable.done", key="task_id", durable=True)
class Done(msgspec.Struct):
    task_id: str


class Doer(Agent):
    name = "doer"
    produces = (Done,)

    def __init__(self) -> None:
        self.attempts: dict[str, int] = defaultdict(int)
        self.seen_ids: list[str | None] = []

    @on(Task)
    async def do(self, task: Task, ctx: Context) -> Done:
        self.attempts[task.task_id] += 1
        self.seen_ids.append(ctx.message_id)
        if task.permanent:
            raise PermanentError(f"task {task.task_id} can never work")
        if self.attempts[task.task_id] <= task.fail_times:
            raise ConnectionError(f"flaky backend, attempt {self.attempts[task.task_id]}")
        return Done(task_id=task.task_id)


async def test_durable_command_sent_while_no_agent_runs_is_handled_once_it_starts(bus: Bus) -> None:
    await bus.publish(Task(task_id="early"))  # stored in the stream, acknowledged by JetStream
    doer = Doer()
    async with bus.expect(Done, where=lambda d: d.task_id == "early") as got:
        async with run_agents(bus, doer):
            await got.wait()
    assert doer.attempts["early"] == 1


async def test_transient_failures_are_retried_with_backoff_until_the_handler_succeeds(bus: Bus) -> None:
    doer = Doer()
    async with run_agents(bus, doer) as worker:
        async with bus.expect(Done, where=lambda d: d.task_id == "flaky"):
            await bus.publish(Task(task_id="flaky", fail_times=2))
    assert doer.attempts["flaky"] == 3
    assert len(set(doer.seen_ids)) == 1  # every delivery carries the same message id
    assert worker.stats["doer"].dead_lettered == 0


async def test_permanent_error_is_dead_lettered_at_once_without_retries(bus: Bus) -> None:
    doer = Doer()
    async with run_agents(bus, doer):
        dlq = await bus.nc.subscribe("busagents.dlq.doer")
        await bus.publish(Task(task_id="doomed", permanent=True))
        dead = await dlq.next_msg(timeout=10)
        await dlq.unsubscribe()
    assert dead.headers is not None
    assert dead.headers["Ba-Dlq-Stage"] == "handler"
    assert dead.headers["Ba-Dlq-Deliveries"] == "1"
    assert "PermanentError: task doomed can never work" in dead.headers["Ba-Dlq-Reason"]
    assert doer.attempts["doomed"] == 1


async def test_undecodable_durable_message_is_dead_lettered_and_never_redelivered(bus: Bus) -> None:
    doer = Doer()
    async with run_agents(bus, doer) as worker:
        await bus.ensure_stream(Task)
        dlq = await bus.nc.subscribe("busagents.dlq.doer")
        await bus.js.publish("test.durable.task.bad", b'{"task_id": 42}', headers={"Ba-Contract": "Task"})
        dead = await dlq.next_msg(timeout=10)
        await dlq.unsubscribe()
        async with bus.expect(Done, where=lambda d: d.task_id == "after-bad"):  # the agent keeps serving
            await bus.publish(Task(task_id="after-bad"))
        await wait_settled(bus, "BA_Task", "doer", 10)  # terminated: nothing left to redeliver
    assert dead.headers is not None and dead.headers["Ba-Dlq-Stage"] == "decode"
    assert "Expected `str`, got `int` - at `$.task_id`" in dead.headers["Ba-Dlq-Reason"]
    assert worker.stats["doer"].dead_lettered == 1


async def test_a_publish_repeated_with_the_same_message_id_is_stored_once(bus: Bus) -> None:
    before = (await bus.js.stream_info(await bus.ensure_stream(Task))).state.messages
    for _ in range(3):
        await bus.publish(Task(task_id="retried"), msg_id="same-id-every-time")
    after = (await bus.js.stream_info("BA_Task")).state.messages
    assert after - before == 1


async def test_the_first_durable_publish_makes_its_stream_even_with_a_core_subscriber_listening(bus: Bus) -> None:
    # the subject has a listener but no stream yet: nobody answers a JetStream publish, so the
    # stream must exist before the first one (not only after a "no responders")
    listener = await bus.nc.subscribe("test.durable.task.>")
    await bus.flush()
    started = asyncio.get_running_loop().time()
    await bus.publish(Task(task_id="first"))
    took = asyncio.get_running_loop().time() - started
    stored = (await bus.js.stream_info("BA_Task")).state.messages
    heard = await listener.next_msg(timeout=5)
    await listener.unsubscribe()
    assert stored == 1 and b'"first"' in heard.data
    assert took < 2.0, f"the publish waited {took:.1f}s: it timed out before the stream was made"


def test_output_ids_are_derived_from_the_input_so_a_redelivery_republishes_the_same_ids() -> None:
    assert derived_id("m1", "doer", 0) == derived_id("m1", "doer", 0)
    assert len({derived_id("m1", "doer", 0), derived_id("m1", "doer", 1), derived_id("m1", "other", 0)}) == 3


# The same handler code on core NATS or JetStream


@event("test.durable.ping")
class Ping(msgspec.Struct):
    n: int


class CorePinger(Agent):
    name = "core-pinger"

    def __init__(self) -> None:
        self.got: asyncio.Queue[int] = asyncio.Queue()

    @on(Ping)
    async def ping(self, msg: Ping, ctx: Context) -> None:
        await self.got.put(msg.n)


class DurablePinger(CorePinger):
    name = "durable-pinger"

    @on(Ping, durable=Durability(ack_wait=2.0))
    async def ping(self, msg: Ping, ctx: Context) -> None:
        await super().ping(msg, ctx)


async def test_one_handler_runs_on_core_nats_or_on_a_durable_consumer_by_subscription_choice(bus: Bus) -> None:
    core, durable = CorePinger(), DurablePinger()
    assert not CorePinger.handlers[Ping].durable
    assert DurablePinger.handlers[Ping].durable
    async with run_agents(bus, core, durable):
        await bus.publish(Ping(n=1))
        assert await asyncio.wait_for(core.got.get(), 5) == 1
        assert await asyncio.wait_for(durable.got.get(), 5) == 1
        info = await bus.js.consumer_info("BA_Ping", "durable-pinger")
    assert info.config.ack_wait == 2.0
    with pytest.raises(Exception, match="consumer not found"):
        await bus.js.consumer_info("BA_Ping", "core-pinger")


def test_a_query_cannot_be_consumed_durably() -> None:
    from busagents import query

    class Answer(msgspec.Struct):
        x: int

    @query("test.durable.ask", reply=Answer)
    class Ask(msgspec.Struct):
        x: int

    with pytest.raises(ContractError, match="cannot be durable"):
        on(Ask, durable=True)


def test_ordering_needs_a_keyed_contract() -> None:
    with pytest.raises(ContractError, match="needs a keyed contract"):

        @command("test.durable.unkeyed", durable=Durability(ordered_partitions=4))
        class Unkeyed(msgspec.Struct):
            n: int


# Per-key order


@command("test.durable.step", key="flight_id", durable=Durability(ack_wait=2.0, ordered_partitions=4))
class Step(msgspec.Struct):
    flight_id: str
    seq: int


class Stepper(Agent):
    name = "stepper"
    max_concurrency = 8

    def __init__(
        self, seen: dict[str, list[int]], replica: str, replicas: list[str], total: int, all_seen: asyncio.Event
    ) -> None:
        self.seen = seen
        self.replica = replica
        self.replicas = replicas
        self.total = total
        self.all_seen = all_seen

    @on(Step)
    async def step(self, msg: Step, ctx: Context) -> None:
        assert ctx.subject == f"test.durable.step.{msg.flight_id}"  # the published subject, not the partition's
        await asyncio.sleep(0.001 * (msg.seq % 3))  # uneven work: without ordering, replicas would overtake
        self.seen[msg.flight_id].append(msg.seq)
        self.replicas.append(self.replica)
        if len(self.replicas) == self.total:
            self.all_seen.set()


async def test_messages_of_one_key_are_handled_in_order_across_replicas(nats_server: NatsServer) -> None:
    seen: dict[str, list[int]] = defaultdict(list)
    replicas: list[str] = []
    keys, per_key = 12, 25
    buses = [await Bus.connect(nats_server.url) for _ in range(3)]
    try:
        for seq in range(per_key):  # all stored first, so each replica pulls many steps of a key at once
            await asyncio.gather(*(buses[2].publish(Step(flight_id=f"F{k}", seq=seq)) for k in range(keys)))
        all_seen = asyncio.Event()
        workers = [
            Worker([Stepper(seen, name, replicas, keys * per_key, all_seen)], bus)
            for name, bus in zip("ab", buses, strict=False)
        ]
        await asyncio.gather(*(w.start() for w in workers))
        try:
            await asyncio.wait_for(all_seen.wait(), 20)
        finally:
            await asyncio.gather(*(w.drain() for w in workers))
    finally:
        for bus in buses:
            await bus.close()
    assert all(seen[f"F{k}"] == list(range(per_key)) for k in range(keys)), dict(seen)
    assert set(replicas) == {"a", "b"}  # both replicas worked


# Dead letters: inspect and replay


class Fragile(Agent):
    """Fails permanently while ``broken``; records the message ids it failed on and handled."""

    name = "fragile"

    def __init__(self) -> None:
        self.broken = True
        self.failed: list[str | None] = []
        self.handled: list[str | None] = []
        self.handled_once = asyncio.Event()

    @on(Task, durable=QUICK)
    async def do(self, task: Task, ctx: Context) -> None:
        if self.broken:
            self.failed.append(ctx.message_id)
            raise PermanentError(f"backend down for {task.task_id}")
        self.handled.append(ctx.message_id)
        self.handled_once.set()


def busagents_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUSAGENTS_NATS_URL": ""}
    return subprocess.run(
        [sys.executable, "-m", "busagents", *args], capture_output=True, text=True, timeout=60, env=env
    )


async def test_dead_letters_are_listed_shown_and_replayed_with_a_new_id_each_time_but_the_original_message_id() -> None:
    with NatsServer() as server:
        bus = await Bus.connect(server.url)
        fragile = Fragile()
        try:
            async with run_agents(bus, fragile):
                arrivals = await bus.nc.subscribe("busagents.dlq.fragile")
                envelope = await bus.publish(Task(task_id="t-1"))
                await arrivals.next_msg(timeout=10)  # the dead letter, as it is stored
                await arrivals.unsubscribe()
                (letter,) = await dead_letters(bus, agent="fragile")

                listed = await asyncio.to_thread(busagents_cli, "dlq", "list", "--nats", server.url)
                shown = await asyncio.to_thread(busagents_cli, "dlq", "show", str(letter.seq), "--nats", server.url)
                fragile.broken = False
                replayed = await asyncio.to_thread(
                    busagents_cli, "dlq", "replay", str(letter.seq), "--nats", server.url
                )
                again = await asyncio.to_thread(busagents_cli, "dlq", "replay", str(letter.seq), "--nats", server.url)
                await wait_settled(bus, "BA_Task", "fragile", 10)  # both replays handled
                stored = (await bus.js.stream_info("BA_Task")).state.messages
        finally:
            await bus.close()
    assert listed.returncode == 0, listed.stderr
    assert f"{letter.seq}" in listed.stdout and "fragile" in listed.stdout and "backend down for t-1" in listed.stdout
    assert shown.returncode == 0, shown.stderr
    assert '"task_id": "t-1"' in shown.stdout and "Ba-Dlq-Reason" in shown.stdout
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed #{letter.seq} on test.durable.task.t-1 as replay.{letter.seq}." in replayed.stdout
    assert "stored in BA_Task #2" in replayed.stdout and "stored in BA_Task #3" in again.stdout
    assert again.returncode == 0, again.stderr
    assert fragile.handled == fragile.failed * 2  # ctx.message_id is the original's; each replay is delivered
    assert fragile.handled[0] is not None and fragile.handled[0].startswith(f"{envelope.id}:")
    assert stored == 3  # the original and two replays


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((), "give the sequence numbers"),
        (("1", "--all"), "either sequence numbers or --all, not both"),
        (("1", "--agent", "fragile"), "--agent narrows --all"),
    ],
)
def test_dlq_replay_needs_exactly_one_selection(args: tuple[str, ...], error: str) -> None:
    result = busagents_cli("dlq", "replay", *args, "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert error in result.stderr


# The idempotency helper


def test_idempotency_records_the_id_with_the_effect_and_rolls_both_back_together() -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE effects (n INTEGER)")
    once = Idempotency(db)
    with pytest.raises(RuntimeError), once("m1") as first:
        assert first
        db.execute("INSERT INTO effects VALUES (1)")
        raise RuntimeError("crash after the effect, before the commit")
    assert not once.seen("m1")
    assert db.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 0
    for _ in range(3):  # the redeliveries
        with once("m1") as first:
            if first:
                db.execute("INSERT INTO effects VALUES (1)")
    assert once.seen("m1")
    assert db.execute("SELECT COUNT(*) FROM effects").fetchone()[0] == 1


def test_idempotency_needs_an_autocommit_connection() -> None:
    with pytest.raises(Exception, match="autocommit"):
        Idempotency(sqlite3.connect(":memory:"))


def test_swarm_permissions_let_a_durable_agent_pull_ack_and_publish_to_its_streams() -> None:
    from busagents.swarm.graph import Graph

    perms = Graph([Doer]).permissions()["doer"]
    assert "$JS.API.CONSUMER.MSG.NEXT.BA_Task.doer" in perms["publish"]  # pull from its own consumer only
    assert "$JS.ACK.BA_Task.doer.>" in perms["publish"]  # ack, nak, in-progress, term
    assert "$JS.API.STREAM.CREATE.BA_Done" in perms["publish"]  # its durable output's stream
    assert "$JS.API.STREAM.CREATE.BUSAGENTS_DLQ" in perms["publish"]  # its dead letters
    assert not any(".BA_Done." in s or s.endswith("BA_Task.>") for s in perms["publish"])  # nothing more
    assert "_INBOX.doer.>" in perms["subscribe"]  # pulled messages and publish acks, on its own inbox
    assert "test.durable.task.*" not in perms["subscribe"]  # a pull consumer: no core subscription


@command("test.durable.chore", durable=Durability(ack_wait=30.0, batch=64))
class Chore(msgspec.Struct):
    n: int


class Chores(Agent):
    name = "chores"
    max_concurrency = 1

    def __init__(self, done: list[int], started: asyncio.Event, all_done: asyncio.Event | None = None) -> None:
        self.done = done
        self.started = started
        self.all_done = all_done

    @on(Chore)
    async def chore(self, chore: Chore, ctx: Context) -> None:
        self.started.set()
        await asyncio.sleep(0.05)  # work in progress when the drain starts
        self.done.append(chore.n)
        if self.all_done is not None and len(self.done) == 20:
            self.all_done.set()


async def test_drain_finishes_the_message_in_hand_and_gives_back_the_buffered_ones_at_once(bus: Bus) -> None:
    done: list[int] = []
    first_started = asyncio.Event()
    for n in range(20):
        await bus.publish(Chore(n=n))
    first = Worker([Chores(done, first_started)], bus)
    await first.start()
    await asyncio.wait_for(first_started.wait(), 5)
    assert await first.drain()  # one chore in hand, the rest buffered in this replica
    in_hand = len(done)
    assert in_hand >= 1
    second_bus = await Bus.connect(bus.url)
    try:
        all_done = asyncio.Event()
        async with run_agents(second_bus, Chores(done, asyncio.Event(), all_done)):
            await asyncio.wait_for(all_done.wait(), 10)  # far below the 30 s ack wait: no redelivery needed
    finally:
        await second_bus.close()
    assert sorted(done) == list(range(20))  # none lost, none done twice
