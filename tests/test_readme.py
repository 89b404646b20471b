"""The README's tour runs as written."""

from __future__ import annotations

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
