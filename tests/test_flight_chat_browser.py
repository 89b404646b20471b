"""The chat page in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
talks to the flight agents, the concierge among them, over the test's nats-server.

``make test`` installs ``chromium`` with apt when it is missing; the test does not skip without it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
from busagents_travel import Flight, FlightStatusUpdated
from playwright.async_api import Page, async_playwright, expect

from busagents import Bus
from busagents.testing import run_agents

CHROMIUM = "/usr/bin/chromium"
DAY = generate(flights=12, passengers=300, seed=11)
WAIT_MS = 30_000  # for an answer or a notice: the agents share two busy cores with the rest of the suite


def _cancel(flight: Flight) -> FlightStatusUpdated:
    return FlightStatusUpdated(
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


@asynccontextmanager
async def _page(shots: Path) -> AsyncIterator[Page]:
    """A page of headless Chromium; on failure, a screenshot of it in ``shots`` (the path printed)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            page = await browser.new_page()
            try:
                yield page
            except BaseException:
                shot = shots / "chat-failure.png"
                await page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of the chat page: {shot}")
                raise
        finally:
            await browser.close()


async def _ask(page: Page, text: str) -> None:
    await page.locator("#text").fill(text)
    await page.locator("#text").press("Enter")


async def test_a_traveller_asks_twice_in_the_browser_and_sees_a_notice_of_their_flight_arrive(
    bus: Bus, tmp_path: Path
) -> None:
    booking = next(b for b in DAY.bookings if b.legs and len(b.passengers) == 1)
    passenger = booking.passengers[0].passenger_id
    flight = next(f for f in DAY.flights if f.flight_id == booking.legs[0].flight_id)
    store = open_store(str(tmp_path / "bookings.sqlite3"))
    agents = (
        ContextAgent(DAY),
        FlightMonitor(),
        ReasonerAgent("offline"),
        Rebooker(store, DAY, load=True),
        Notifier(OutboxChannel(str(tmp_path / "outbox.jsonl"))),
        ConciergeAgent("offline"),
    )
    async with run_agents(bus, *agents), ChatGateway(bus) as gateway, _page(tmp_path) as page:
        await page.goto(f"{gateway.url}?passenger={passenger}")
        await expect(page.locator("#status")).to_have_text(f"connected as {passenger}")
        answers, questions = page.locator(".answer"), page.locator(".question")

        await _ask(page, "What is the status of my flight?")
        await expect(answers).to_have_count(1, timeout=WAIT_MS)
        await expect(answers.nth(0)).to_contain_text(flight.number)
        await _ask(page, "and the next one?")
        await expect(answers).to_have_count(2, timeout=WAIT_MS)
        await expect(questions).to_have_count(2)
        # "and the next one?" names no place: the answer knows the journey from the first turn
        second = answers.nth(1)
        await expect(second).not_to_have_text(await answers.nth(0).inner_text())
        await expect(second).to_contain_text(flight.origin)
        await expect(second).to_contain_text(flight.destination)
        await expect(second.locator(".facts li").first).to_contain_text(flight.destination)
        await expect(second.locator("time")).to_have_text(re.compile(r"\d\d:\d\d:\d\d"))

        await bus.publish(_cancel(flight), conversation_id="chat-test-disruption")
        notice = page.locator(".notice")
        await expect(notice).to_have_count(1, timeout=WAIT_MS)
        await expect(notice).to_contain_text(flight.number)
        await expect(notice.locator("time")).to_contain_text("notice")
