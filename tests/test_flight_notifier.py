"""The notifier: one rendered notice per passenger, in the outbox before PassengerNotified says so."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from busagents_flight.notifier import Notifier, OutboxChannel
from busagents_travel import BookingChanged, Leg, Passenger, PassengerNotified
from nats.aio.msg import Msg

from busagents import Bus
from busagents.testing import run_agents

OLD = Leg("BX124-25NOV", "BX124", "LHR", "AMS", 1_764_064_800, 1_764_069_000, "Y", ["12A", "12B"])
NEW = Leg("BX128-25NOV", "BX128", "LHR", "AMS", 1_764_079_200, 1_764_083_400, "Y", ["7C", "7D"])


async def test_each_passenger_is_in_the_outbox_when_their_notification_is_published(bus: Bus, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    change = BookingChanged(
        decision_id="d-1", disruption_id="BX124-25NOV#1", booking_id="ABC123", flight_id="BX124-25NOV",
        action="rebook", passengers=[Passenger("p-1", "Ada Lovelace"), Passenger("p-2", "Charles Babbage")],
        old_legs=[OLD], new_legs=[NEW], rationale="BX124 was cancelled; BX128 is the earliest arrival",
    )  # fmt: skip
    in_outbox: list[int] = []  # lines in the outbox when each PassengerNotified arrived
    both = asyncio.Event()

    async def on_notified(msg: Msg) -> None:
        in_outbox.append(len(outbox.read_text().splitlines()) if outbox.exists() else 0)
        if len(in_outbox) == 2:
            both.set()

    async with run_agents(bus, Notifier(OutboxChannel(outbox))):
        sub = await bus.nc.subscribe("travel.passenger.notified.>", cb=on_notified)
        async with bus.expect(PassengerNotified, count=2) as got:
            await bus.publish(change)
        await asyncio.wait_for(both.wait(), 10)
        await sub.unsubscribe()
        # read while the notifier still runs: nothing may wait in a buffer until it stops
        assert in_outbox[0] >= 1 and in_outbox[1] == 2, in_outbox
        notices = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert {n["passenger_id"] for n in notices} == {"p-1", "p-2"}
    assert {m.body.passenger_id for m in got.messages} == {"p-1", "p-2"}
    assert all("BX128" in m.body.text for m in got.messages)
