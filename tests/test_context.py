"""The handler's context: the message identity it keys idempotent effects and output ids on."""

from __future__ import annotations

import asyncio

import msgspec

from busagents import Agent, Bus, Context, Durability, command, event, on
from busagents.envelope import MSG_ID, REPLAY_OF
from busagents.testing import run_agents

QUICK = Durability(ack_wait=5.0, max_deliver=3, backoff=(0.05,))


@command("test.context.decide", key="booking_id", durable=QUICK)
class Decide(msgspec.Struct):
    booking_id: str
    flight_id: str


@event("test.context.changed", key="booking_id", durable=QUICK)
class Changed(msgspec.Struct):
    booking_id: str
    flight_id: str


class Booker(Agent):
    """Records each delivery's message id and the id its output was stored under."""

    name = "booker"
    produces = (Changed,)

    def __init__(self) -> None:
        self.handled: asyncio.Queue[tuple[str | None, str]] = asyncio.Queue()

    @on(Decide)
    async def decide(self, cmd: Decide, ctx: Context) -> None:
        out = await ctx.publish(Changed(booking_id=cmd.booking_id, flight_id=cmd.flight_id))
        self.handled.put_nowait((ctx.message_id, out.id))

    async def next(self) -> tuple[str | None, str]:
        return await asyncio.wait_for(self.handled.get(), 10)


def body(booking: str, flight: str) -> bytes:
    return msgspec.json.encode(Decide(booking_id=booking, flight_id=flight))


async def test_two_different_messages_claiming_one_replay_of_keep_apart(bus: Bus) -> None:
    booker = Booker()
    async with run_agents(bus, booker):
        for n, flight in enumerate(["BA117", "BA119"]):
            headers = {MSG_ID: f"forged-{n}", REPLAY_OF: "someone-elses-id"}
            await bus.js.publish("test.context.decide.B1", body("B1", flight), headers=headers)
        first, second = await booker.next(), await booker.next()
    assert first[0] != second[0]  # idempotency keys differ: both effects happen
    assert first[1] != second[1]  # output ids differ: neither BookingChanged is dropped
    assert (await bus.js.stream_info("BA_Changed")).state.messages == 2


async def test_a_replay_of_the_same_bytes_is_the_same_message(bus: Bus) -> None:
    booker = Booker()
    async with run_agents(bus, booker):
        await bus.js.publish("test.context.decide.B2", body("B2", "BA117"), headers={MSG_ID: "orig"})
        original = await booker.next()
        replay = {MSG_ID: "orig.replay.7", REPLAY_OF: "orig"}
        await bus.js.publish("test.context.decide.B2", body("B2", "BA117"), headers=replay)
        replayed = await booker.next()
    assert replayed == original  # same idempotency key, same output id (stored once)
    assert original[0] is not None and original[0].startswith("orig:")
    assert (await bus.js.stream_info("BA_Changed")).state.messages == 1


async def test_one_id_on_two_different_bodies_names_two_messages(bus: Bus) -> None:
    booker = Booker()
    async with run_agents(bus, booker):
        await bus.js.publish("test.context.decide.B3", body("B3", "BA117"), headers={MSG_ID: "same"})
        first = await booker.next()
        replay = {MSG_ID: "same.replay.1", REPLAY_OF: "same"}
        await bus.js.publish("test.context.decide.B3", body("B3", "BA999"), headers=replay)
        second = await booker.next()
    assert first[0] != second[0] and first[1] != second[1]


class Flaky(Booker):
    """Publishes its output, then fails the first delivery (as a crash after the publish would)."""

    name = "flaky-booker"

    def __init__(self) -> None:
        super().__init__()
        self.deliveries = 0

    @on(Decide)
    async def decide(self, cmd: Decide, ctx: Context) -> None:
        if cmd.booking_id != "B4":
            return  # another test's message, should its stream have outlived it
        self.deliveries += 1
        out = await ctx.publish(Changed(booking_id=cmd.booking_id, flight_id=cmd.flight_id))
        self.handled.put_nowait((ctx.message_id, out.id))
        if self.deliveries == 1:
            raise ConnectionError("the store went away after the publish")


async def test_a_message_without_an_id_is_known_by_its_place_in_the_stream(bus: Bus) -> None:
    flaky = Flaky()
    async with run_agents(bus, flaky):
        await bus.js.publish("test.context.decide.B4", body("B4", "BA117"))  # a plain client: no headers
        first, again = await flaky.next(), await flaky.next()
    assert first == again  # the redelivery has the same identity and republishes the same output id
    assert first[0] is not None and first[0].startswith("BA_Decide.")
    stored = await bus.js.stream_info("BA_Changed", subjects_filter="test.context.changed.B4")
    assert stored.state.subjects == {"test.context.changed.B4": 1}
