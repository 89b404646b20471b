"""What acts on the world is durable: a disruption published while the reasoner is down is not lost."""

from __future__ import annotations

from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.reasoner import GROUP_SIZE, ReasonerAgent
from busagents_travel import DisruptionAssessed, FlightCancelled, RebookGroup

from busagents import Bus
from busagents.contract import contract_info
from busagents.testing import run_agents

from .flight_expect import expect_decisions

DAY = generate(flights=24, passengers=1500, seed=9)


async def test_a_disruption_published_while_the_reasoner_is_down_is_decided_once_it_starts(bus: Bus) -> None:
    flight = max(DAY.flights, key=lambda f: sum(1 for b in DAY.bookings if b.legs[0].flight_id == f.flight_id))
    on_it = [b for b in DAY.bookings if any(leg.flight_id == flight.flight_id for leg in b.legs)]
    assert on_it
    assert all(contract_info(c).durable for c in (FlightCancelled, RebookGroup))
    # nobody listens yet: on core NATS this disruption would be gone
    await bus.publish(
        FlightCancelled(
            disruption_id=f"{flight.flight_id}#1", flight_id=flight.flight_id, number=flight.number,
            origin=flight.origin, destination=flight.destination, reason="crew", observed_at=flight.departure - 7200,
        )
    )  # fmt: skip
    async with bus.expect(DisruptionAssessed, where=lambda a: a.flight_id == flight.flight_id, timeout=20) as assessed:
        async with expect_decisions(bus, count=len(on_it), timeout=20) as decided:
            async with run_agents(bus, ContextAgent(DAY), ReasonerAgent("offline")):
                await decided.wait()
    assert assessed.message.body.affected_bookings == len(on_it)
    assert sorted(d.booking_id for d in decided.items) == sorted(b.booking_id for b in on_it)
    assert decided.groups == -(-len(on_it) // GROUP_SIZE)  # the case's decisions travel in groups
