"""``@on(C, read_as=P)``: a handler gets each message decoded into a projection of its contract."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from busagents import Agent, Bus, Context, ContractError, event, on
from busagents.dlq import DLQ_REASON, DLQ_STAGE
from busagents.testing import run_agents

from .test_upcasters import Delayed, DelayedV1
from .test_worker import DeadLetters


class _Leg(msgspec.Struct):
    flight_id: str
    seats: list[str]


@event("test.readas.group", durable=True)
class Group(msgspec.Struct):
    group_id: str
    legs: list[_Leg]
    rationale: str
    notes: list[str] = []


class SeatsOnly(msgspec.Struct):
    """What the view reads of a Group: the seats, and the rationale left as undecoded JSON."""

    legs: list[_Leg]
    rationale: msgspec.Raw = msgspec.Raw(b'""')


@event("test.readas.held")
class Held(msgspec.Struct):
    seats: list[str]
    kind: str
    rationale: str


class SeatView(Agent):
    """Every replica reads every group, but only the seats of it."""

    name = "readas-view"
    produces = (Held,)

    @on(Group, view=True, read_as=SeatsOnly)
    async def given(self, group: SeatsOnly, ctx: Context) -> Held:
        seats = [f"{leg.flight_id}/{s}" for leg in group.legs for s in leg.seats]
        return Held(seats=seats, kind=type(group).__name__, rationale=bytes(group.rationale).decode())


class _SeatsAsText(msgspec.Struct):
    legs: list[dict[str, str]]  # a seat list is not a string: such a projection fails to decode


class Strict(Agent):
    name = "readas-strict"
    produces = (Held,)

    @on(Group, durable=True, read_as=_SeatsAsText)
    async def given(self, group: _SeatsAsText, ctx: Context) -> Held:
        return Held(seats=[], kind=type(group).__name__, rationale="")


async def test_a_view_handler_gets_the_projection_and_only_what_it_reads_is_checked(bus: Bus) -> None:
    legs = [_Leg("BX1", ["1A", "1B"]), _Leg("BX2", ["3C"])]
    async with run_agents(bus, SeatView()):
        async with bus.expect(Held) as held:
            await bus.publish(Group(group_id="g1", legs=legs, rationale="a storm"))
        # a field the projection does not read is not checked: notes of the wrong type pass
        async with bus.expect(Held, where=lambda h: h.seats == ["BX3/9F"]) as loose:
            await bus.nc.publish(
                "test.readas.group",
                b'{"group_id": "g2", "legs": [{"flight_id": "BX3", "seats": ["9F"]}], "rationale": "x", "notes": 7}',
                headers={"Ba-Contract": "Group"},
            )
    assert held.message.body == Held(seats=["BX1/1A", "BX1/1B", "BX2/3C"], kind="SeatsOnly", rationale='"a storm"')
    assert loose.message.body.kind == "SeatsOnly"


async def test_a_message_that_does_not_decode_into_the_projection_is_dead_lettered(bus: Bus) -> None:
    async with run_agents(bus, Strict()) as worker, DeadLetters(bus, "readas-strict") as dlq:
        await bus.publish(Group(group_id="g1", legs=[_Leg("BX1", ["1A"])], rationale="r"))
        dead = await dlq.next(timeout=10)
    assert dead.headers is not None and dead.headers[DLQ_STAGE] == "decode"
    assert dead.headers[DLQ_REASON] == "Group (as _SeatsAsText): Expected `str`, got `array` - at `$.legs[0][...]`"
    assert worker.stats["readas-strict"].dead_lettered == 1


class DelaySeconds(msgspec.Struct):
    delay_seconds: int


@event("test.readas.seen")
class SeenDelay(msgspec.Struct):
    delay_seconds: int
    kind: str


class Projected(Agent):
    name = "readas-upcast"
    produces = (SeenDelay,)

    @on(Delayed, read_as=DelaySeconds)
    async def seen(self, msg: DelaySeconds, ctx: Context) -> SeenDelay:
        return SeenDelay(delay_seconds=msg.delay_seconds, kind=type(msg).__name__)


async def test_a_message_of_an_earlier_version_is_upcast_then_projected(bus: Bus) -> None:
    async with run_agents(bus, Projected()):
        async with bus.expect(SeenDelay) as got:
            await bus.publish(DelayedV1(flight_id="BA1", delay_minutes=2))
    assert got.message.body == SeenDelay(delay_seconds=120, kind="DelaySeconds")


def test_read_as_must_be_a_type_msgspec_decodes_and_the_one_the_handler_takes() -> None:
    class NotMsgspec:
        pass

    with pytest.raises(ContractError, match="not a type msgspec can decode into"):

        class Bad(Agent):
            @on(Group, view=True, read_as=NotMsgspec)
            async def given(self, group: NotMsgspec, ctx: Context) -> None:
                return None

    with pytest.raises(ContractError, match="annotated Group, but read_as=SeatsOnly"):

        class Mismatch(Agent):
            @on(Group, view=True, read_as=SeatsOnly)
            async def given(self, group: Group, ctx: Context) -> None:
                return None

    assert asyncio.iscoroutinefunction(SeatView.given)
