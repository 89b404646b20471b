"""The worker: dead letters, bounded concurrency, undeclared output, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys

import msgspec
import pydantic
import pytest
from nats.aio.msg import Msg

from busagents import Agent, Bus, ConfigError, Context, Durability, QueryFailedError, command, event, on, query
from busagents.dlq import DLQ_AGENT, DLQ_DELIVERIES, DLQ_MSG_ID, DLQ_REASON, DLQ_STAGE, DLQ_SUBJECT
from busagents.server import NatsServer
from busagents.testing import run_agents
from busagents.worker import Worker

from .drain_agent import Done, Job, Started, child_env


@event("test.worker.order", key="order_id")
class Order(msgspec.Struct):
    order_id: str
    quantity: int


@event("test.worker.accepted")
class Accepted(msgspec.Struct):
    order_id: str


@event("test.worker.audit")
class Audit(msgspec.Struct):
    note: str


class Shop(Agent):
    name = "shop"
    produces = (Accepted,)

    @on(Order)
    async def take(self, order: Order, ctx: Context) -> Accepted:
        if order.quantity < 0:
            raise ValueError(f"negative quantity {order.quantity}")
        if order.quantity == 13:
            return Audit(note="not declared")  # type: ignore[return-value]
        return Accepted(order_id=order.order_id)


class DeadLetters:
    """Collects dead letters of one agent."""

    def __init__(self, bus: Bus, agent: str) -> None:
        self.bus = bus
        self.subject = f"busagents.dlq.{agent}"
        self.got: asyncio.Queue[Msg] = asyncio.Queue()

    async def __aenter__(self) -> DeadLetters:
        async def on_msg(msg: Msg) -> None:
            self.got.put_nowait(msg)

        self.sub = await self.bus.nc.subscribe(self.subject, cb=on_msg)
        await self.bus.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def next(self, timeout: float = 5.0) -> Msg:
        return await asyncio.wait_for(self.got.get(), timeout)


async def assert_still_serving(bus: Bus, order_id: str) -> None:
    async with bus.expect(Accepted, where=lambda a: a.order_id == order_id):
        await bus.publish(Order(order_id=order_id, quantity=1))


@pytest.mark.parametrize(
    ("payload", "stage", "reason_part"),
    [
        (b"{not json", "decode", "malformed JSON"),
        (b'{"order_id": "o1", "quantity": "three"}', "decode", "Expected `int`, got `str` - at `$.quantity`"),
        (b'{"order_id": "o1"}', "decode", "missing required field `quantity`"),
    ],
    ids=["malformed", "wrong_type", "missing_field"],
)
async def test_undecodable_payload_is_dead_lettered_and_agent_keeps_serving(
    bus: Bus, payload: bytes, stage: str, reason_part: str
) -> None:
    async with run_agents(bus, Shop()) as worker, DeadLetters(bus, "shop") as dlq:
        headers = {"Ba-Contract": "Order", "Nats-Msg-Id": "m-1", "X-Custom": "kept"}
        await bus.nc.publish("test.worker.order.o1", payload, headers=headers)
        dead = await dlq.next()
        await assert_still_serving(bus, "o2")
    assert dead.data == payload  # the original bytes
    assert dead.headers is not None
    assert dead.headers[DLQ_STAGE] == stage
    assert reason_part in dead.headers[DLQ_REASON]
    assert dead.headers[DLQ_SUBJECT] == "test.worker.order.o1"
    assert dead.headers[DLQ_AGENT] == "shop"
    assert dead.headers["X-Custom"] == "kept"  # the original headers
    assert dead.headers[DLQ_MSG_ID] == "m-1"  # its own Nats-Msg-Id is per agent, for the DLQ stream
    assert worker.stats["shop"].dead_lettered == 1
    assert worker.stats["shop"].handled == 1


def deeply_nested(depth: int = 1_001) -> bytes:
    """An Order whose unknown field holds arrays nested ``depth`` deep: msgspec gives up recursing."""
    return b'{"order_id": "deep", "quantity": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


async def test_json_nested_too_deeply_is_dead_lettered_at_the_decode_stage(bus: Bus) -> None:
    async with run_agents(bus, Shop()) as worker, DeadLetters(bus, "shop") as dlq:
        await bus.nc.publish("test.worker.order.deep", deeply_nested())
        dead = await dlq.next()
        await assert_still_serving(bus, "shallow")
    assert dead.headers is not None
    assert dead.headers[DLQ_STAGE] == "decode"
    assert "nested too deeply" in dead.headers[DLQ_REASON]
    assert worker.stats["shop"].dead_lettered == 1


@command("test.worker.durable_order", durable=Durability(max_deliver=3, backoff=(0.1,)))
class DurableOrder(msgspec.Struct):
    order_id: str
    quantity: int


class DurableShop(Agent):
    name = "durable-shop"

    def __init__(self) -> None:
        self.handled: list[str] = []

    @on(DurableOrder)
    async def take(self, order: DurableOrder, ctx: Context) -> None:
        self.handled.append(order.order_id)


async def test_durable_json_nested_too_deeply_is_dead_lettered_at_once_not_retried(bus: Bus) -> None:
    async with run_agents(bus, DurableShop()), DeadLetters(bus, "durable-shop") as dlq:
        await bus.js.publish("test.worker.durable_order", deeply_nested())
        dead = await dlq.next()
    assert dead.headers is not None
    assert dead.headers[DLQ_STAGE] == "decode"  # not max-deliveries, with its false "process died" reason
    assert "nested too deeply" in dead.headers[DLQ_REASON]
    assert dead.headers[DLQ_DELIVERIES] == "1"


async def test_raising_handler_is_dead_lettered_and_agent_keeps_serving(bus: Bus) -> None:
    async with run_agents(bus, Shop()), DeadLetters(bus, "shop") as dlq:
        await bus.publish(Order(order_id="bad", quantity=-5))
        dead = await dlq.next()
        await assert_still_serving(bus, "good")
    assert dead.headers is not None
    assert dead.headers[DLQ_STAGE] == "handler"
    assert dead.headers[DLQ_REASON] == "ValueError: negative quantity -5"
    assert msgspec.json.decode(dead.data) == {"order_id": "bad", "quantity": -5}


async def test_wrong_contract_or_version_is_dead_lettered(bus: Bus) -> None:
    async with run_agents(bus, Shop()), DeadLetters(bus, "shop") as dlq:
        body = b'{"order_id": "x", "quantity": 1}'
        await bus.nc.publish("test.worker.order.x", body, headers={"Ba-Contract": "Refund"})
        wrong_contract = await dlq.next()
        await bus.nc.publish("test.worker.order.x", body, headers={"Ba-Contract": "Order", "Ba-Version": "2"})
        wrong_version = await dlq.next()
        await assert_still_serving(bus, "y")
    assert wrong_contract.headers is not None and wrong_version.headers is not None
    assert wrong_contract.headers[DLQ_STAGE] == "contract"
    assert "expected contract Order, got Refund" in wrong_contract.headers[DLQ_REASON]
    assert wrong_version.headers[DLQ_STAGE] == "version"
    assert "version 2 of Order is not accepted here: accepted 1" in wrong_version.headers[DLQ_REASON]


async def test_undeclared_output_never_leaves_the_process(bus: Bus) -> None:
    async with run_agents(bus, Shop()), DeadLetters(bus, "shop") as dlq:
        audits = await bus.nc.subscribe("test.worker.audit")
        await bus.publish(Order(order_id="u", quantity=13))
        dead = await dlq.next()
        await assert_still_serving(bus, "after")
        assert audits.pending_msgs == 0  # the round trip above would have brought it
        await audits.unsubscribe()
    assert dead.headers is not None
    assert "UndeclaredContractError" in dead.headers[DLQ_REASON]
    assert "may not send Audit" in dead.headers[DLQ_REASON]


class Total(msgspec.Struct):
    cents: int


@query("test.worker.price", reply=Total)
class PriceOf(msgspec.Struct):
    quantity: int


class Till(Agent):
    """Answers prices and takes orders, one message at a time (so a reply would precede the next answer)."""

    name = "till"
    max_concurrency = 1
    produces = (Accepted,)

    @on(PriceOf)
    async def price(self, query: PriceOf, ctx: Context) -> Total:
        if query.quantity < 0:
            raise ValueError(f"no price for {query.quantity}")
        return Total(cents=100 * query.quantity)

    @on(Order)
    async def take(self, order: Order, ctx: Context) -> Accepted:
        if order.quantity < 0:
            raise ValueError(f"negative quantity {order.quantity}")
        return Accepted(order_id=order.order_id)


@pytest.mark.parametrize("payload", [b"{not json", b'{"order_id": "r", "quantity": -1}'], ids=["undecodable", "raises"])
async def test_a_bad_event_with_a_reply_subject_gets_no_reply(bus: Bus, payload: bytes) -> None:
    async with run_agents(bus, Till()), DeadLetters(bus, "till") as dlq:
        inbox = bus.nc.new_inbox()
        replies = await bus.nc.subscribe(inbox)
        await bus.nc.publish("test.worker.order.r", payload, reply=inbox)
        await dlq.next()
        await assert_still_serving(bus, "after")  # one lane: any reply was sent before this answer
        assert replies.pending_msgs == 0
        await replies.unsubscribe()


async def test_a_failing_query_gets_its_error_reply(bus: Bus) -> None:
    async with run_agents(bus, Till()), DeadLetters(bus, "till") as dlq:
        with pytest.raises(QueryFailedError, match="ValueError: no price for -1"):
            await bus.request(PriceOf(quantity=-1), timeout=5)
        await dlq.next()
        assert await bus.request(PriceOf(quantity=2)) == Total(cents=200)


class Gate(Agent):
    """Holds every message until released, counting how many run at once."""

    name = "gate"
    max_concurrency = 3

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.seen = 0
        self.release = asyncio.Event()
        self.three_in = asyncio.Event()

    @on(Order)
    async def hold(self, order: Order, ctx: Context) -> None:
        self.running += 1
        self.seen += 1
        self.peak = max(self.peak, self.running)
        if self.running == 3:
            self.three_in.set()
        await self.release.wait()
        self.running -= 1


async def test_concurrency_is_bounded_per_agent(bus: Bus) -> None:
    gate = Gate()
    async with run_agents(bus, gate) as worker:
        for i in range(10):
            await bus.publish(Order(order_id=f"c{i}", quantity=1))
        await asyncio.wait_for(gate.three_in.wait(), 5)
        await bus.flush()  # the other 7 reached the worker and wait in its queue
        assert gate.seen == 3
        assert worker.stats["gate"].in_flight == 3
        gate.release.set()
    assert gate.peak == 3
    assert gate.seen == 10  # drain finished the queued ones too


@event("test.worker.pydantic")
class Greeting(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1)


@event("test.worker.greeted")
class Greeted(pydantic.BaseModel):
    text: str


class Greeter(Agent):
    produces = (Greeted,)

    @on(Greeting)
    async def greet(self, msg: Greeting, ctx: Context) -> Greeted:
        return Greeted(text=f"hello {msg.name}")


async def test_pydantic_contracts_work_and_invalid_ones_are_dead_lettered(bus: Bus) -> None:
    async with run_agents(bus, Greeter()), DeadLetters(bus, "greeter") as dlq:
        async with bus.expect(Greeted) as got:
            await bus.publish(Greeting(name="Ada"))
        await bus.nc.publish("test.worker.pydantic", b'{"name": ""}')
        dead = await dlq.next()
    assert got.message.body == Greeted(text="hello Ada")
    assert dead.headers is not None
    assert "at $.name" in dead.headers[DLQ_REASON]


async def test_drain_on_sigterm_finishes_the_message_in_flight(bus: Bus, nats_server: NatsServer) -> None:
    env = child_env()
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "busagents",
        "run",
        "drain_agent:Slow",
        "--nats",
        nats_server.url,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await stats.next_msg(timeout=15)  # subscribed and serving
        await stats.unsubscribe()
        async with bus.expect(Done, where=lambda d: d.n == 1, timeout=10) as done:
            async with bus.expect(Started, where=lambda s: s.n == 1):
                await bus.publish(Job(n=1))
            proc.send_signal(signal.SIGTERM)  # the job is in flight now
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert done.message.body.n == 1
    assert proc.returncode == 0, output.decode()


async def test_worker_rejects_two_agents_with_one_name(bus: Bus) -> None:
    from busagents import ContractError

    with pytest.raises(ContractError, match="unique"):
        Worker([Shop(), Shop()], bus)


@command("test.worker.blocked", durable=True)
class Blocked(msgspec.Struct):
    n: int


class Steady(Agent):
    """Serves core and durable messages and runs a loop: everything a start sets up."""

    name = "steady"
    produces = (Accepted,)

    def __init__(self) -> None:
        self.stopped = False

    async def on_stop(self, ctx: Context) -> None:
        self.stopped = True

    async def run(self, ctx: Context) -> None:
        await asyncio.Event().wait()

    @on(Order)
    async def take(self, order: Order, ctx: Context) -> Accepted:
        return Accepted(order_id=order.order_id)

    @on(DurableOrder)
    async def keep(self, order: DurableOrder, ctx: Context) -> None:
        pass


class Stuck(Agent):
    """Its durable stream cannot be created: another stream already captures the subject."""

    name = "stuck"

    @on(Blocked)
    async def handle(self, msg: Blocked, ctx: Context) -> None:
        pass


class NoStart(Agent):
    name = "no-start"

    async def on_start(self, ctx: Context) -> None:
        raise RuntimeError("the database is not there")

    @on(Order)
    async def take(self, order: Order, ctx: Context) -> None:
        pass


async def assert_start_fails_leaving_nothing(bus: Bus, worker: Worker, error: type[Exception], match: str) -> None:
    tasks = asyncio.all_tasks()
    subscriptions = set(bus.nc._subs)
    with pytest.raises(error, match=match):
        await worker.start()
    assert set(bus.nc._subs) == subscriptions  # every subscription made was unsubscribed
    assert {t for t in asyncio.all_tasks() if not t.done()} <= tasks  # lanes, loops and keepers are gone


async def test_a_start_that_fails_half_way_leaves_nothing_running(bus: Bus) -> None:
    from nats.js.api import StreamConfig

    await bus.js.add_stream(StreamConfig(name="BLOCKER", subjects=["test.worker.blocked"]))
    steady = Steady()
    worker = Worker([steady, Stuck()], bus)
    await assert_start_fails_leaving_nothing(bus, worker, ConfigError, "cannot create stream BA_Blocked")
    assert steady.stopped  # its on_start ran, so its on_stop did too
    assert await worker.drain()  # nothing left to drain


async def test_an_agent_failing_its_on_start_stops_the_agents_started_before_it(bus: Bus) -> None:
    steady = Steady()
    worker = Worker([steady, NoStart()], bus)
    await assert_start_fails_leaving_nothing(bus, worker, RuntimeError, "the database is not there")
    assert steady.stopped


async def test_cancelling_serve_drains_the_worker(bus: Bus) -> None:
    class Looping(Steady):
        def __init__(self) -> None:
            super().__init__()
            self.running = asyncio.Event()

        async def run(self, ctx: Context) -> None:
            self.running.set()
            await asyncio.Event().wait()

    await bus.js.account_info()  # nats-py makes its request inbox (and its task) on the first request, for good
    tasks = asyncio.all_tasks()
    subscriptions = set(bus.nc._subs)
    agent = Looping()
    serving = asyncio.create_task(Worker([agent], bus).serve())
    await asyncio.wait_for(agent.running.wait(), 5)
    await assert_still_serving(bus, "before-cancel")  # started (a cancelled flush would break nats-py)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert agent.stopped
    assert set(bus.nc._subs) == subscriptions
    assert {t for t in asyncio.all_tasks() if not t.done()} <= tasks


@event("test.worker.noted", durable=True)
class Noted(msgspec.Struct):
    n: int


class Stubborn(Agent):
    """Its view handler and its run loop each swallow one cancel, as Python 3.11's ``asyncio.wait_for``
    does when its result arrives together with the cancel (nats-py's ``next_msg`` waits with it)."""

    name = "stubborn"

    def __init__(self) -> None:
        self.viewing = asyncio.Event()
        self.running = asyncio.Event()
        self.swallowed = 0

    async def run(self, ctx: Context) -> None:
        self.running.set()
        await self._swallow_one_cancel()
        await asyncio.Event().wait()

    @on(Noted, view=True)
    async def noted(self, msg: Noted, ctx: Context) -> None:
        self.viewing.set()
        await self._swallow_one_cancel()

    async def _swallow_one_cancel(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.swallowed += 1


async def test_drain_ends_tasks_that_swallowed_their_cancel(bus: Bus) -> None:
    stubborn = Stubborn()
    worker = Worker([stubborn], bus, drain_timeout=10)
    await worker.start()
    await bus.publish(Noted(n=1))
    await asyncio.wait_for(asyncio.gather(stubborn.viewing.wait(), stubborn.running.wait()), 10)
    async with asyncio.timeout(8):
        await worker.drain()
    assert stubborn.swallowed == 2  # both were cancelled again, and stopped


async def test_a_worker_asked_to_freeze_the_start_up_heap_does_so_while_it_serves_and_serves(bus: Bus) -> None:
    # busagents run and the demo ask for it: a large start-up heap (the flight day) is then not walked
    # by every full collection; it is unfrozen when the worker stops, for a process that goes on
    data = [{"n": i} for i in range(10_000)]  # built before start: frozen with the rest
    gc.unfreeze()  # whatever an earlier test in this process left frozen
    worker = Worker([Shop()], bus, freeze_gc=True)
    await worker.start()
    try:
        assert gc.get_freeze_count() >= len(data)
        async with bus.expect(Accepted, timeout=10) as got:
            await bus.publish(Order(order_id="o-1", quantity=1))
        assert got.message.body == Accepted(order_id="o-1")
    finally:
        await worker.drain()
    assert gc.get_freeze_count() == 0
