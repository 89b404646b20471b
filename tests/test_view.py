"""View subscriptions over a real nats-server: every replica reads every message, replayed from the stream's start."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from busagents import Agent, Bus, Context, ContractError, Worker, event, on, query
from busagents.errors import QueryFailedError
from busagents.server import NatsServer
from busagents.swarm.graph import Graph
from busagents.testing import run_agents


@event("test.view.price", key="item", durable=True)
class PriceSet(msgspec.Struct):
    item: str
    cents: int


class Total(msgspec.Struct):
    items: int
    cents: int
    replica: str


@query("test.view.total", reply=Total)
class AskTotal(msgspec.Struct):
    pass


@query("test.view.fresh-total", reply=Total)
class AskFreshTotal(msgspec.Struct):
    pass


class PriceBook(Agent):
    """A materialised view of the latest price of every item."""

    name = "price-book"

    def __init__(self, replica: str, gate: asyncio.Event | None = None) -> None:
        self.replica = replica
        self.prices: dict[str, int] = {}
        self.gate = gate
        self.at_gate = asyncio.Event()
        self.changed = asyncio.Event()

    @on(PriceSet, view=True)
    async def price(self, msg: PriceSet, ctx: Context) -> None:
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        self.prices[msg.item] = msg.cents
        self.changed.set()

    @on(AskTotal)
    async def total(self, q: AskTotal, ctx: Context) -> Total:
        return Total(items=len(self.prices), cents=sum(self.prices.values()), replica=self.replica)

    @on(AskFreshTotal)
    async def fresh_total(self, q: AskFreshTotal, ctx: Context) -> Total:
        await ctx.catch_up()  # not older than the stream
        return Total(items=len(self.prices), cents=sum(self.prices.values()), replica=self.replica)


async def _second_bus(nats_server: NatsServer) -> Bus:
    return await Bus.connect(nats_server.url, name="view-replica")


async def _until(books: tuple[PriceBook, ...], done: Callable[[], bool], timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not done():
            for book in books:
                book.changed.clear()
            waits = [asyncio.ensure_future(b.changed.wait()) for b in books]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    await asyncio.wait_for(wait(), timeout)


async def test_every_replica_of_a_view_sees_every_message(bus: Bus, nats_server: NatsServer) -> None:
    other = await _second_bus(nats_server)
    a, b = PriceBook("a"), PriceBook("b")
    try:
        async with run_agents(bus, a), run_agents(other, b):
            for i in range(200):
                await bus.publish(PriceSet(item=f"i{i % 50}", cents=i))
            await _until((a, b), lambda: a.prices.get("i49") == 199 and b.prices.get("i49") == 199)
    finally:
        await other.close()
    expected = {f"i{k}": 150 + k for k in range(50)}  # the last price of each item, in stream order
    assert a.prices == expected
    assert b.prices == expected


async def test_a_late_replica_rebuilds_the_view_from_the_stream(bus: Bus) -> None:
    for i in range(300):
        await bus.publish(PriceSet(item=f"i{i % 30}", cents=i))
    late = PriceBook("late")
    async with run_agents(bus, late) as worker:
        # start() returned: the replay of the 300 stored messages is done before queries are served
        assert len(late.prices) == 30
        reply = await bus.request(AskTotal())
    assert reply.items == 30
    assert reply.cents == sum(270 + k for k in range(30))
    assert worker.view_ready_seconds["price-book"] >= 0


async def test_queries_are_not_served_until_the_view_caught_up(bus: Bus) -> None:
    for i in range(20):
        await bus.publish(PriceSet(item=f"i{i}", cents=1))
    gate = asyncio.Event()
    book = PriceBook("gated", gate)
    worker = Worker([book], bus, drain_timeout=5)
    starting = asyncio.create_task(worker.start())
    try:
        await asyncio.wait_for(book.at_gate.wait(), 5.0)  # replaying, held at the gate
        assert not starting.done()
        assert not worker._views[0].is_ready
        with pytest.raises(QueryFailedError, match="no agent answers"):
            await bus.request(AskTotal(), timeout=1.0)  # not half an answer: no answer at all
        gate.set()
        await asyncio.wait_for(starting, 5.0)
        reply = await bus.request(AskTotal())
        assert reply.items == 20
    finally:
        gate.set()
        if not starting.done():
            await starting
        await worker.drain()


def test_a_view_of_a_core_contract_is_a_clear_error() -> None:
    @event("test.view.core")
    class Core(msgspec.Struct):
        x: int

    with pytest.raises(ContractError, match="not durable"):

        class Bad(Agent):
            @on(Core, view=True)
            async def seen(self, msg: Core, ctx: Context) -> None: ...


def test_view_permissions_allow_an_ordered_consumer_and_no_shared_one() -> None:
    perms = Graph([PriceBook]).permissions()["price-book"]
    assert "$JS.API.CONSUMER.CREATE.BA_PriceSet" in perms["publish"]
    assert not any(p.startswith("$JS.API.CONSUMER.MSG.NEXT.") for p in perms["publish"])


async def test_a_view_follows_the_stream_across_a_server_restart(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "js") as server:
        bus = await Bus.connect(server.url, name="view-restart")
        book = PriceBook("r")
        try:
            async with run_agents(bus, book):
                for i in range(50):
                    await bus.publish(PriceSet(item=f"i{i}", cents=i))
                await _until((book,), lambda: len(book.prices) == 50)
                await asyncio.to_thread(server.restart)
                for i in range(50, 100):
                    await bus.publish(PriceSet(item=f"i{i}", cents=i))
                await _until((book,), lambda: len(book.prices) == 100, timeout=20)
        finally:
            await bus.close()
    assert book.prices == {f"i{i}": i for i in range(100)}


async def test_an_answer_after_catch_up_includes_every_event_stored_before_the_question(bus: Bus) -> None:
    gate = asyncio.Event()
    book = PriceBook("fresh", gate)
    async with run_agents(bus, book):
        await bus.publish(PriceSet(item="a", cents=5))  # stored; the view holds it at the gate
        await asyncio.wait_for(book.at_gate.wait(), 5.0)
        stale = await bus.request(AskTotal())
        asking = asyncio.create_task(bus.request(AskFreshTotal(), timeout=5.0))
        await asyncio.sleep(0)  # let the request go out
        assert not asking.done()
        gate.set()
        fresh = await asking
    assert stale.items == 0  # a plain read answers from the view as it is
    assert (fresh.items, fresh.cents) == (1, 5)  # catch_up waited for the event stored before the question


@event("test.view.blob", key="name", durable=True)
class Blob(msgspec.Struct):
    name: str
    body: str


class BlobCount(Agent):
    name = "blob-count"

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.names: list[str] = []
        self.done = asyncio.Event()

    @on(Blob, view=True)
    async def blob(self, msg: Blob, ctx: Context) -> None:
        self.names.append(msg.name)
        if len(self.names) == self.expected:
            self.done.set()


async def test_a_view_replays_a_stream_larger_than_flow_control_lets_through_unanswered(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view reads its messages off nats-py's queue itself (busagents._natspy.next_pushed): it must
    answer the consumer's flow control as nats-py's next_msg does, or the replay stops."""
    from nats.aio.client import Client

    answered: list[str] = []
    publish = Client.publish

    async def counting(self: Client, subject: str, *args: object, **kwargs: object) -> None:
        if subject.startswith("$JS.FC."):
            answered.append(subject)
        await publish(self, subject, *args, **kwargs)  # type: ignore[arg-type]

    import busagents.view

    # server heartbeats (which carry a stalled consumer's flow control again) only every 30 s: the
    # replay does not finish within the 60 s below on them, only with flow control answered as asked
    monkeypatch.setattr(busagents.view, "_HEARTBEAT", 30.0)
    body = "x" * 700_000
    count = 120  # 84 MB: well past what the server sends before it asks for flow control
    for i in range(count):
        await bus.publish(Blob(name=f"b{i}", body=body))
    monkeypatch.setattr(Client, "publish", counting)
    counter = BlobCount(expected=count)
    async with run_agents(bus, counter):
        await asyncio.wait_for(counter.done.wait(), 60)
    assert counter.names == [f"b{i}" for i in range(count)]  # all of them, in stream order
    assert answered  # the server asked, and was answered


def test_stream_position_reads_both_forms_of_the_ack_subject() -> None:
    from nats.aio.msg import Msg
    from nats.errors import NotJSMessageError

    from busagents._natspy import stream_position

    def msg(reply: str) -> Msg:
        return Msg(_client=None, subject="s", reply=reply)  # type: ignore[arg-type]

    assert stream_position(msg("$JS.ACK.ORDERS.view.1.812.40.1764480000000000000.17")) == (812, 17)
    v2 = "$JS.ACK.hub.ACCHASH.ORDERS.view.1.812.40.1764480000000000000.17.RANDOM"
    assert stream_position(msg(v2)) == (812, 17)
    assert stream_position(msg(v2.rsplit(".", 1)[0])) == (812, 17)  # the random token is optional
    for reply in ("", "_INBOX.abc.1", "$JS.ACK.too.short"):
        with pytest.raises(NotJSMessageError):
            stream_position(msg(reply))
