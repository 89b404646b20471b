"""Hostile input on the wire never stalls an agent: its connection stays up and it keeps serving.

Bytes nats-py could not read (a header block or subject it choked on) ended its read loop, and
the agent stayed connected but deaf until stale detection, minutes later (so did the PONG of a
flush given up on). Each case runs against an agent on its own connection.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Callable

import msgspec
import pytest
import pytest_asyncio

from busagents import Agent, Bus, Context, Durability, command, event, on
from busagents.server import NatsServer
from busagents.testing import run_agents

QUICK = 5.0  # seconds: "within a few seconds", where a deaf connection took minutes


@command("test.hostile.work", key="key")
class Work(msgspec.Struct):
    key: str
    n: int
    out: str = "ok"  # the output's key, so the end of its subject
    pad: int = 0  # characters of padding in the output


STORED = Durability(stream="TEST_HOSTILE_STORED", max_deliver=3, backoff=(0.1,))


@command("test.hostile.stored", key="key", durable=STORED)
class StoredWork(msgspec.Struct):
    key: str
    n: int
    out: str = "ok"
    pad: int = 0


@event("test.hostile.done", key="out")
class Done(msgspec.Struct):
    key: str
    n: int
    out: str
    pad: str = ""


class Hostile(Agent):
    """Answers each Work with a Done as large and with the key the Work asks for."""

    name = "hostile"
    produces = (Done,)

    @on(Work)
    async def work(self, msg: Work, ctx: Context) -> Done:
        return Done(key=msg.key, n=msg.n, out=msg.out, pad="x" * msg.pad)


class HostileStored(Agent):
    """The same on a durable contract, counting its calls."""

    name = "hostile-stored"
    produces = (Done,)

    def __init__(self) -> None:
        self.calls: list[int] = []

    @on(StoredWork)
    async def work(self, msg: StoredWork, ctx: Context) -> Done:
        self.calls.append(msg.n)
        return Done(key=msg.key, n=msg.n, out=msg.out, pad="x" * msg.pad)


@pytest_asyncio.fixture
async def agent_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """The agent's own connection: what the hostile bytes and outputs could break."""
    connected = await Bus.connect(nats_server.url, name="hostile-agent")
    try:
        yield connected
    finally:
        await connected.close()


def assert_unharmed(agent_bus: Bus) -> None:
    nc = agent_bus.nc
    assert nc.is_connected, "the agent's connection is gone"
    assert nc.stats["reconnects"] == 0, "the agent's connection was replaced"


# Raw protocol, written by hand: what a hostile client can send.


async def send_raw(url: str, *commands: bytes) -> None:
    """Send ``commands`` from a plain TCP connection; returns once the server has processed them."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        await asyncio.wait_for(reader.readline(), QUICK)  # INFO
        connect = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
        writer.write(connect + b"".join(commands) + b"PING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), QUICK)
        assert answer == b"PONG\r\n", f"the server refused the commands: {answer!r}"
    finally:
        writer.close()
        await writer.wait_closed()


def pub(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)


def hpub(subject: bytes, block: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(block), len(block) + len(payload), block, payload)


def work(n: int) -> bytes:
    return msgspec.json.encode(Work(key="k", n=n))


def number(n: int) -> Callable[[Done], bool]:
    return lambda done: done.n == n


HOSTILE_BYTES = {
    "a header status line that is not UTF-8": hpub(b"test.hostile.work.k", b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", work(1)),
    "a header block with no line end": hpub(b"test.hostile.work.k", b"NATS/1.0", work(1)),
    "a header block that is not one": hpub(b"test.hostile.work.k", b"XXXX", work(1)),
    "a subject that is not UTF-8": pub(b"test.hostile.work.\xff\xfe", work(1)),
    "a reply subject that is not UTF-8": pub(b"test.hostile.work.k", work(1), reply=b"reply.\xff\xfe"),
    "a subject with a form feed": pub(b"test.hostile.work.k\x0cx", work(1)),
}


@pytest.mark.parametrize("case", list(HOSTILE_BYTES))
async def test_bytes_nats_py_choked_on_reach_the_agent_and_it_keeps_serving(
    bus: Bus, agent_bus: Bus, nats_server: NatsServer, case: str
) -> None:
    async with run_agents(agent_bus, Hostile()):
        async with bus.expect(Done, where=number(1), timeout=QUICK):  # the hostile message itself is handled
            await send_raw(nats_server.url, HOSTILE_BYTES[case])
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert_unharmed(agent_bus)


async def test_a_stored_message_with_a_subject_that_is_not_utf8_is_handled_once_not_poison(
    bus: Bus, agent_bus: Bus, nats_server: NatsServer
) -> None:
    agent = HostileStored()
    async with run_agents(agent_bus, agent):
        async with bus.expect(Done, where=number(1), timeout=QUICK):
            await send_raw(nats_server.url, pub(b"test.hostile.stored.\xff\xfe", msgspec.json.encode(Work("k", 1))))
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(StoredWork(key="k", n=2))
        await settled(bus, agent.name)
    assert agent.calls == [1, 2]
    assert_unharmed(agent_bus)


async def settled(bus: Bus, consumer: str) -> None:
    """Wait until the consumer has nothing pending nor unacknowledged."""
    async with asyncio.timeout(QUICK):
        while True:
            info = await bus.js.consumer_info(STORED.stream or "", consumer)
            if not info.num_pending and not info.num_ack_pending:
                return
            await asyncio.sleep(0.05)  # polling the server's own account of the consumer


async def test_the_pong_of_a_flush_given_up_on_leaves_the_connection_reading(bus: Bus, agent_bus: Bus) -> None:
    # A flush that times out or is cancelled (a drain with a deadline) cancels its PONG's future;
    # nats-py then failed to set its result when the PONG came and its read loop ended.
    async with run_agents(agent_bus, Hostile()):
        flushing = asyncio.create_task(agent_bus.nc.flush())
        await asyncio.sleep(0)  # one step of the task: its PING goes out
        assert agent_bus.nc._pongs, "the flush did not send its PING yet"
        flushing.cancel()
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert flushing.cancelled()
    assert_unharmed(agent_bus)
