"""Upcasters: a v2 agent handles v1 messages converted; other versions are dead-lettered naming those accepted."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from busagents import Agent, Bus, Context, ContractError, event, on, upcaster
from busagents.contract import upcasters
from busagents.dlq import DLQ_REASON, DLQ_STAGE
from busagents.testing import run_agents

from .test_worker import DeadLetters

README = Path(__file__).parent.parent / "README.md"


@event("test.upcast.delayed", name="Delayed", version=1, key="flight_id")
class DelayedV1(msgspec.Struct):
    flight_id: str
    delay_minutes: int


@event("test.upcast.delayed", name="Delayed", version=2, key="flight_id")
class DelayedV2(msgspec.Struct):
    flight_id: str
    delay_seconds: int


@event("test.upcast.delayed", name="Delayed", version=3, key="flight_id")
class Delayed(msgspec.Struct):
    flight_id: str
    delay_seconds: int
    cause: str = "unknown"


@event("test.upcast.delayed", name="Delayed", version=4, key="flight_id")
class DelayedV4(msgspec.Struct):
    flight_id: str


@upcaster(DelayedV1, DelayedV2)
def _minutes_to_seconds(old: DelayedV1) -> DelayedV2:
    return DelayedV2(flight_id=old.flight_id, delay_seconds=old.delay_minutes * 60)


@upcaster(DelayedV2, Delayed)
def _with_cause(old: DelayedV2) -> Delayed:
    return Delayed(flight_id=old.flight_id, delay_seconds=old.delay_seconds)


@event("test.upcast.seen")
class Seen(msgspec.Struct):
    flight_id: str
    delay_seconds: int
    cause: str


class Watcher(Agent):
    """Handles version 3 of Delayed; versions 1 and 2 arrive upcast."""

    name = "upcast-watcher"
    produces = (Seen,)

    @on(Delayed)
    async def seen(self, msg: Delayed, ctx: Context) -> Seen:
        assert type(msg) is Delayed
        return Seen(flight_id=msg.flight_id, delay_seconds=msg.delay_seconds, cause=msg.cause)


async def test_a_v3_agent_handles_v1_and_v2_messages_through_the_chain_of_upcasters(bus: Bus) -> None:
    async with run_agents(bus, Watcher()):
        async with bus.expect(Seen, where=lambda s: s.flight_id == "BA1") as v1:
            await bus.publish(DelayedV1(flight_id="BA1", delay_minutes=2))
        async with bus.expect(Seen, where=lambda s: s.flight_id == "BA2") as v2:
            await bus.publish(DelayedV2(flight_id="BA2", delay_seconds=30))
        async with bus.expect(Seen, where=lambda s: s.flight_id == "BA3") as v3:
            await bus.publish(Delayed(flight_id="BA3", delay_seconds=5, cause="weather"))
    assert v1.message.body == Seen(flight_id="BA1", delay_seconds=120, cause="unknown")
    assert v2.message.body == Seen(flight_id="BA2", delay_seconds=30, cause="unknown")
    assert v3.message.body == Seen(flight_id="BA3", delay_seconds=5, cause="weather")


async def test_an_unknown_version_is_dead_lettered_naming_the_accepted_versions(bus: Bus) -> None:
    async with run_agents(bus, Watcher()), DeadLetters(bus, "upcast-watcher") as dlq:
        await bus.publish(DelayedV4(flight_id="BA4"))
        newer = await dlq.next()
        body = b'{"flight_id": "BA5", "delay_minutes": "late"}'  # sent as v1, but not a v1 body
        await bus.nc.publish("test.upcast.delayed.BA5", body, headers={"Ba-Contract": "Delayed", "Ba-Version": "1"})
        undecodable = await dlq.next()
    assert newer.headers is not None and undecodable.headers is not None
    assert newer.headers[DLQ_STAGE] == "version"
    assert newer.headers[DLQ_REASON] == "version 4 of Delayed is not accepted here: accepted 1 (upcast), 2 (upcast), 3"
    assert undecodable.headers[DLQ_STAGE] == "decode"
    reason = "Delayed: Expected `int`, got `str` - at `$.delay_minutes` (sent as version 1)"
    assert undecodable.headers[DLQ_REASON] == reason


class DurableWatcher(Agent):
    """The same handler on a JetStream durable consumer."""

    name = "upcast-durable"
    produces = (Seen,)

    @on(Delayed, durable=True)
    async def seen(self, msg: Delayed, ctx: Context) -> Seen:
        return Seen(flight_id=msg.flight_id, delay_seconds=msg.delay_seconds, cause=msg.cause)


async def test_a_durable_handler_upcasts_too_and_dead_letters_an_unknown_version(bus: Bus) -> None:
    async with run_agents(bus, DurableWatcher()), DeadLetters(bus, "upcast-durable") as dlq:
        async with bus.expect(Seen, where=lambda s: s.flight_id == "BD1") as v1:
            await bus.publish(DelayedV1(flight_id="BD1", delay_minutes=1))
        await bus.publish(DelayedV4(flight_id="BD4"))
        newer = await dlq.next()
    assert v1.message.body == Seen(flight_id="BD1", delay_seconds=60, cause="unknown")
    assert newer.headers is not None
    assert newer.headers[DLQ_REASON] == "version 4 of Delayed is not accepted here: accepted 1 (upcast), 2 (upcast), 3"


def test_upcasters_compose_into_one_function_per_earlier_version() -> None:
    chains = upcasters(Delayed)
    assert sorted(chains) == [1, 2]
    source, chain = chains[1]
    assert source is DelayedV1
    assert chain(DelayedV1(flight_id="X", delay_minutes=1)) == Delayed(flight_id="X", delay_seconds=60)
    assert upcasters(DelayedV1) == {}


def test_an_upcaster_converts_versions_of_one_contract_to_a_later_one() -> None:
    with pytest.raises(ContractError, match="to a later version"):
        upcaster(Delayed, DelayedV1)
    with pytest.raises(ContractError, match="versions of one contract"):
        upcaster(DelayedV1, Seen)
    with pytest.raises(ContractError, match="already registered"):
        upcaster(DelayedV1, DelayedV2)(_minutes_to_seconds)


def test_the_readme_upcaster_example_converts_v1_to_v2() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "@upcaster" in b]
    namespace: dict[str, Any] = {"__name__": "readme_upcaster"}
    exec(example, namespace)
    v1, v2 = namespace["FlightDelayedV1"], namespace["FlightDelayed"]
    (source, chain), *_ = upcasters(v2).values()
    assert source is v1
    assert chain(v1(flight_id="BA117", delay_minutes=3)) == v2(flight_id="BA117", delay_seconds=180)
