"""The envelope: ids carried across hops, headers round-trip, plain-NATS messages accepted."""

from __future__ import annotations

import os

import msgspec
import pytest

from busagents import Agent, Bus, Context, Envelope, event, on
from busagents.envelope import new_id
from busagents.testing import run_agents


@event("test.hops.a")
class HopA(msgspec.Struct):
    n: int


@event("test.hops.b")
class HopB(msgspec.Struct):
    n: int


@event("test.hops.c")
class HopC(msgspec.Struct):
    n: int


@event("test.hops.d")
class HopD(msgspec.Struct):
    n: int


class First(Agent):
    produces = (HopB,)

    @on(HopA)
    async def hop(self, msg: HopA, ctx: Context) -> HopB:
        return HopB(n=msg.n + 1)


class Second(Agent):
    produces = (HopC,)

    @on(HopB)
    async def hop(self, msg: HopB, ctx: Context) -> HopC:
        return HopC(n=msg.n + 1)


class Third(Agent):
    produces = (HopD,)

    @on(HopC)
    async def hop(self, msg: HopC, ctx: Context) -> None:
        await ctx.publish(HopD(n=msg.n + 1))  # explicit publish joins the conversation too


async def test_conversation_and_causation_ids_cross_three_hops(bus: Bus) -> None:
    async with run_agents(bus, First(), Second(), Third()):
        async with (
            bus.expect(HopB) as got_b,
            bus.expect(HopC) as got_c,
            bus.expect(HopD) as got_d,
        ):
            root = await bus.publish(HopA(n=1), conversation_id="conv-42", sender="test")
    b, c, d = got_b.message, got_c.message, got_d.message
    assert d.body.n == 4
    assert {b.envelope.conversation_id, c.envelope.conversation_id, d.envelope.conversation_id} == {"conv-42"}
    assert b.envelope.causation_id == root.id
    assert c.envelope.causation_id == b.envelope.id
    assert d.envelope.causation_id == c.envelope.id
    assert len({root.id, b.envelope.id, c.envelope.id, d.envelope.id}) == 4
    assert [b.envelope.sender, c.envelope.sender, d.envelope.sender] == ["first", "second", "third"]
    assert (b.envelope.contract, b.envelope.version) == ("HopB", 1)
    assert 0 < root.sent_at_ns <= d.envelope.sent_at_ns


async def test_a_root_message_starts_its_own_conversation(bus: Bus) -> None:
    async with run_agents(bus, First()):
        async with bus.expect(HopB) as got:
            root = await bus.publish(HopA(n=1))
    assert root.conversation_id == root.id
    assert got.message.envelope.conversation_id == root.id


async def test_a_plain_nats_message_without_headers_is_handled(bus: Bus) -> None:
    async with run_agents(bus, First()):
        async with bus.expect(HopB) as got:
            await bus.nc.publish("test.hops.a", b'{"n": 10}')
    assert got.message.body.n == 11
    assert got.message.envelope.causation_id  # a fresh id was given to the headerless cause


def test_headers_round_trip() -> None:
    cause = Envelope.new("A", 1, sender="x", conversation_id="c1")
    env = Envelope.new("B", 2, sender="y", cause=cause)
    env.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    back = Envelope.from_headers(env.to_headers())
    assert back == env
    assert back.conversation_id == "c1"
    assert back.causation_id == cause.id
    assert env.to_headers()["Nats-Msg-Id"] == env.id


def test_message_ids_are_unique_22_character_letters_and_digits() -> None:
    ids = [new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 22 and i.isalnum() and i.isascii() for i in ids)


def test_a_forked_process_does_not_repeat_its_parents_message_ids() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id and leave at once
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    parent_ids = {new_id() for _ in range(10)}
    assert len(child_id) == 22 and child_id[:12] != next(iter(parent_ids))[:12]
