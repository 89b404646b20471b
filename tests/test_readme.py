"""The README's tour runs as written."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from busagents import Bus
from busagents.testing import run_agents

README = Path(__file__).parent.parent / "README.md"


def tour_namespace() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    contracts, agents = blocks[0], blocks[1]
    namespace: dict[str, Any] = {"__name__": "readme_tour"}
    exec(contracts + agents, namespace)
    return namespace


async def test_readme_tour_agents_work_as_shown(bus: Bus) -> None:
    ns = tour_namespace()
    async with run_agents(bus, ns["Rebooker"](), ns["SeatKeeper"]()):
        async with bus.expect(ns["BookingChanged"], where=lambda m: m.booking_id == "B1") as got:
            await bus.publish(ns["RebookPassenger"](booking_id="B1", new_flight_id="BA118"))
    assert got.message.body.flight_id == "BA118"
    assert got.message.envelope.causation_id is not None
    assert got.message.envelope.sender == "rebooker"


async def test_readme_state_example_counts_every_delay(bus: Bus) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (state_block,) = [b for b in blocks if "state_buckets" in b]
    ns = tour_namespace()
    exec(state_block, ns)
    async with run_agents(bus, ns["DelayCounter"]()):  # 8 handlers at once: they race for the key
        for minutes in (10, 20, 30, 40):
            await bus.publish(ns["FlightDelayed"](flight_id="BA117", delay_minutes=minutes))
        delays = await bus.state("delays", ns["Delays"])
        async with asyncio.timeout(10), delays.watch("BA117") as changes:
            async for entry in changes:
                if entry.value.count == 4:
                    break
    assert entry.value == ns["Delays"](4, 100)
