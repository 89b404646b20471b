"""Takes docs/chat.png: the flight agents (offline backends) and the chat page on an embedded
nats-server, a passenger's flight cancelled mid-conversation, in headless Chromium.

    .venv/bin/python docs/chat_screenshot.py docs/chat.png
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from busagents_flight.chat import ChatGateway
from busagents_flight.concierge import ConciergeAgent
from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.monitor import FlightMonitor
from busagents_flight.notifier import Notifier, OutboxChannel
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.rebooker import Rebooker
from busagents_flight.store import open_store
from busagents_travel import Booking, FlightStatusUpdated
from playwright.async_api import Page, async_playwright, expect

from busagents import Bus, NatsServer
from busagents.testing import run_agents

DAY = generate(40, 3000, 7)


def _later_flights(booking: Booking) -> int:
    leg = booking.legs[0]
    return sum(
        f.origin == leg.origin and f.destination == leg.destination and f.departure > leg.departure for f in DAY.flights
    )


async def _ask(page: Page, text: str, answers: int) -> None:
    await page.locator("#text").fill(text)
    await page.locator("#text").press("Enter")
    await expect(page.locator(".answer")).to_have_count(answers, timeout=20_000)


async def main(out: str) -> None:
    booking = next(b for b in DAY.bookings if len(b.legs) == len(b.passengers) == 1 and _later_flights(b) >= 2)
    passenger = booking.passengers[0]
    flight = next(f for f in DAY.flights if f.flight_id == booking.legs[0].flight_id)
    tmp = Path(tempfile.mkdtemp())
    agents = (
        ContextAgent(DAY),
        FlightMonitor(),
        ReasonerAgent("offline"),
        Rebooker(open_store(str(tmp / "bookings.sqlite3")), DAY, load=True),
        Notifier(OutboxChannel(str(tmp / "outbox.jsonl"))),
        ConciergeAgent("offline"),
    )
    about = [(passenger.passenger_id, f"{passenger.name}: {flight.number} {flight.origin}->{flight.destination}")]
    with NatsServer() as server:
        bus = await Bus.connect(server.url)
        async with run_agents(bus, *agents), ChatGateway(bus, passengers=about) as gateway, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path="/usr/bin/chromium")
            page = await browser.new_page(viewport={"width": 900, "height": 980})
            await page.goto(f"{gateway.url}?passenger={passenger.passenger_id}")
            await _ask(page, "What is the status of my flight?", 1)
            cancelled = FlightStatusUpdated(
                flight_id=flight.flight_id,
                number=flight.number,
                origin=flight.origin,
                destination=flight.destination,
                scheduled_departure=flight.departure,
                scheduled_arrival=flight.arrival,
                status="cancelled",
                seq=1,
                observed_at=flight.departure - 3600,
                reason="crew",
            )
            await bus.publish(cancelled)
            await expect(page.locator(".notice")).to_have_count(1, timeout=20_000)
            await _ask(page, "is there a later one?", 2)
            await _ask(page, "put me on that one", 3)
            await page.screenshot(path=out)
            await browser.close()
        await bus.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "docs/chat.png"))
