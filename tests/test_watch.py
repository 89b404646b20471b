"""``busagents watch``: the bus live, decoded with the installed contracts, filtered by conversation."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.monitor import FlightMonitor
from busagents_travel import Flight, FlightCancelled, FlightStatusUpdated

from busagents import Bus, contract_info
from busagents.server import NatsServer
from busagents.testing import run_agents

DAY = generate(flights=12, passengers=300, seed=11)


def _cancel(f: Flight) -> FlightStatusUpdated:
    return FlightStatusUpdated(
        flight_id=f.flight_id,
        number=f.number,
        origin=f.origin,
        destination=f.destination,
        scheduled_departure=f.departure,
        scheduled_arrival=f.arrival,
        status="cancelled",
        seq=1,
        observed_at=f.departure - 3600,
        reason="crew",
    )


async def test_watch_decodes_a_running_agents_messages_of_one_conversation(bus: Bus, nats_server: NatsServer) -> None:
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", "watch", "--json", "--conversation", "conv-watched", "--nats", nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert watch.stdout is not None and watch.stderr is not None
    try:
        which = await asyncio.wait_for(watch.stderr.readline(), 30)
        assert which == f"nats: {nats_server.url} (from --nats)\n".encode()
        ready = await asyncio.wait_for(watch.stderr.readline(), 30)  # subscribed: nothing published is missed
        assert b"watching > on" in ready
        other, watched = DAY.flights[2], DAY.flights[5]
        async with run_agents(bus, ContextAgent(DAY), FlightMonitor()):
            async with bus.expect(FlightCancelled, where=lambda c: c.flight_id == other.flight_id):
                await bus.publish(_cancel(other), conversation_id="conv-other")
            async with bus.expect(FlightCancelled, where=lambda c: c.flight_id == watched.flight_id):
                await bus.publish(_cancel(watched), conversation_id="conv-watched")
            lines: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                while not lines or lines[-1]["contract"] != contract_info(FlightCancelled).name:
                    lines.append(json.loads(await watch.stdout.readline()))
    finally:
        watch.terminate()
        await watch.wait()

    assert {line["conversation"] for line in lines} == {"conv-watched"}  # conv-other's were not shown
    update, cancelled = lines[0], lines[-1]
    assert update["contract"] == contract_info(FlightStatusUpdated).name
    assert update["known"] is True and update["body"]["flight_id"] == watched.flight_id
    assert update["body"]["status"] == "cancelled"
    assert cancelled["sender"] == "flight-monitor"
    assert cancelled["body"]["flight_id"] == watched.flight_id and cancelled["body"]["number"] == watched.number
    assert cancelled["causation"] == update["id"]  # the monitor's event names the update that caused it
    assert cancelled["subject"] == f"travel.flight.cancelled.{watched.flight_id}"
