"""Each contract kind over a real nats-server."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import pytest
from nats.aio.msg import Msg

from busagents import Agent, Bus, Context, ContractError, QueryFailedError, command, event, on, query
from busagents.contract import contract_info
from busagents.server import NatsServer
from busagents.testing import run_agents


@event("test.kinds.ping", key="key")
class Ping(msgspec.Struct):
    key: str
    n: int


@command("test.kinds.work")
class Work(msgspec.Struct):
    job: int


@event("test.kinds.worked")
class Worked(msgspec.Struct):
    job: int
    by: str


class Answer(msgspec.Struct):
    total: int


@query("test.kinds.sum", reply=Answer)
class Sum(msgspec.Struct):
    numbers: list[int]


@event("test.kinds.seen")
class Seen(msgspec.Struct):
    n: int
    by: str


def pinged_agent(agent_name: str) -> Agent:
    class Watcher(Agent):
        name = agent_name
        produces = (Seen,)

        @on(Ping)
        async def ping(self, msg: Ping, ctx: Context) -> Seen:
            return Seen(n=msg.n, by=self.name)

    return Watcher()


async def test_event_fans_out_to_every_agent_type(bus: Bus) -> None:
    async with run_agents(bus, pinged_agent("watcher_a"), pinged_agent("watcher_b")):
        async with bus.expect(Seen, count=2, where=lambda s: s.n == 7) as got:
            await bus.publish(Ping(key="k1", n=7))
    assert sorted(m.body.by for m in got.messages) == ["watcher_a", "watcher_b"]
    assert {m.envelope.sender for m in got.messages} == {"watcher_a", "watcher_b"}


class Doer(Agent):
    name = "doer"
    produces = (Worked,)

    def __init__(self, tag: str) -> None:
        self.tag = tag

    @on(Work)
    async def work(self, cmd: Work, ctx: Context) -> Worked:
        return Worked(job=cmd.job, by=self.tag)


async def test_command_is_handled_by_exactly_one_replica(bus: Bus, nats_server: NatsServer) -> None:
    other = await Bus.connect(nats_server.url)
    jobs = 40
    try:
        async with run_agents(bus, Doer("r1")), run_agents(other, Doer("r2")):
            async with bus.expect(Worked, count=jobs) as got:
                for job in range(jobs):
                    await bus.publish(Work(job=job))
            # a late duplicate would arrive right after the expected ones: give it one round trip
            await bus.flush()
            await other.flush()
    finally:
        await other.close()
    handled = [m.body.job for m in got.messages]
    assert sorted(handled) == list(range(jobs))  # each job exactly once
    by = {m.body.by for m in got.messages}
    assert by <= {"r1", "r2"}


class Adder(Agent):
    name = "adder"

    @on(Sum)
    async def add(self, q: Sum, ctx: Context) -> Answer:
        if not q.numbers:
            raise ValueError("nothing to add")
        return Answer(total=sum(q.numbers))


async def test_query_is_answered_with_typed_reply(bus: Bus) -> None:
    async with run_agents(bus, Adder()):
        reply = await bus.request(Sum(numbers=[1, 2, 39]), timeout=5)
    assert isinstance(reply, Answer)
    assert reply.total == 42


class _TotalAsText(msgspec.Struct):
    total: msgspec.Raw  # the reply's JSON for this field, undecoded


class _TotalAsName(msgspec.Struct):
    total: str  # not what the reply holds


async def test_a_reply_is_decoded_into_the_shape_the_requester_reads(bus: Bus) -> None:
    """``reply_as``: a projection of the declared reply, with a field left as raw JSON; a shape the
    reply does not fit fails the query with the reason; a type msgspec cannot decode into is refused."""
    from busagents import ContractError

    async with run_agents(bus, Adder()):
        seen = await bus.request(Sum(numbers=[40, 2]), timeout=5, reply_as=_TotalAsText)
        assert isinstance(seen, _TotalAsText) and bytes(seen.total) == b"42"
        with pytest.raises(
            QueryFailedError, match=r"invalid reply: Answer \(as _TotalAsName\): Expected `str`, got `int`"
        ):
            await bus.request(Sum(numbers=[1]), timeout=5, reply_as=_TotalAsName)
        with pytest.raises(ContractError, match="msgspec can decode"):
            await bus.request(Sum(numbers=[1]), timeout=5, reply_as=asyncio.Event)
        assert (await bus.request(Sum(numbers=[2]), timeout=5)).total == 2  # the declared reply, as before


async def test_query_failure_is_reported_to_the_requester(bus: Bus) -> None:
    async with run_agents(bus, Adder()):
        with pytest.raises(QueryFailedError, match="nothing to add"):
            await bus.request(Sum(numbers=[]), timeout=5)
        assert (await bus.request(Sum(numbers=[2]), timeout=5)).total == 2


async def test_query_without_responder_fails_fast(bus: Bus) -> None:
    with pytest.raises(QueryFailedError, match="no agent answers"):
        await asyncio.wait_for(bus.request(Sum(numbers=[1]), timeout=5), 3)


async def test_wait_for_agents_returns_once_each_type_is_serving(bus: Bus, nats_server: NatsServer) -> None:
    from busagents import Worker

    waiting = asyncio.create_task(bus.wait_for_agents(["doer", "adder"], timeout=10))
    other = await Bus.connect(nats_server.url)
    worker = Worker([Doer("r1"), Adder()], other, heartbeat_interval=0.2)
    try:
        await worker.start()
        await waiting
        async with bus.expect(Worked) as got:  # and they do serve
            await bus.publish(Work(job=5))
        assert got.message.body.job == 5
    finally:
        await worker.drain()
        await other.close()


async def test_wait_for_agents_names_the_missing_ones(bus: Bus) -> None:
    with pytest.raises(TimeoutError, match=r"no heartbeat within 0\.3s from: ghost"):
        await bus.wait_for_agents(["ghost"], timeout=0.3)


@event("test.kinds.stored", durable=True)
class Stored(msgspec.Struct):
    n: int


async def test_a_durable_publish_jetstream_refuses_is_an_error_with_its_reason_not_retried(bus: Bus) -> None:
    await bus.publish(Stored(n=1))  # stored: the stream exists
    info = contract_info(Stored)
    with pytest.raises(ContractError, match=r"JetStream refused Stored on test\.kinds\.stored: wrong last sequence"):
        await bus.publish_durable(info, info.subject, b'{"n": 2}', {"Nats-Expected-Last-Sequence": "999"})


async def test_an_answer_that_is_not_a_jetstream_acknowledgement_is_an_error(bus: Bus) -> None:
    """Something other than JetStream answering on a durable subject (here: no stream stores it, and a
    core responder does) is reported, not taken for a stored message and not retried until the timeout."""

    async def impostor(msg: Msg) -> None:
        await msg.respond(b"hello")

    info = contract_info(Stored)
    sub = await bus.nc.subscribe("test.kinds.impostor", cb=impostor)
    try:
        with pytest.raises(ContractError, match=r"not a JetStream acknowledgement: b'hello'"):
            await bus.publish_durable(info, "test.kinds.impostor", b'{"n": 3}', {})
    finally:
        await sub.unsubscribe()


async def test_a_request_answered_late_or_never_times_out_and_leaves_nothing_behind(bus: Bus) -> None:
    """The connection's request path (every query, every durable publish): no answer is nats-py's
    TimeoutError after the timeout, with nothing left waiting, and an answer that comes after it is
    dropped; a cancelled request leaves nothing either; an answered one gets its answer."""
    nc = bus.nc
    held: asyncio.Queue[Msg] = asyncio.Queue()
    sub = await nc.subscribe("test.late.answer", cb=held.put)  # takes the requests, answers when told
    await bus.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request("test.late.answer", b"1", timeout=0.2)
    assert not nc._resp_map
    late = await asyncio.wait_for(held.get(), 5)
    await nc.publish(late.reply, b"too late")  # nobody waits for it any more

    cancelled = asyncio.create_task(nc.request("test.late.answer", b"2", timeout=5))
    await asyncio.wait_for(held.get(), 5)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not nc._resp_map

    answered = asyncio.create_task(nc.request("test.late.answer", b"3", timeout=5))
    third = await asyncio.wait_for(held.get(), 5)
    await nc.publish(third.reply, b"answer")
    assert (await asyncio.wait_for(answered, 5)).data == b"answer"
    assert not nc._resp_map
    await sub.unsubscribe()
