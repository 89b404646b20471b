"""The chat gateway (busagents_flight.chat) over the test's nats-server: what a page sends and gets,
through its WebSocket (the page itself in a browser: tests/test_flight_chat_browser.py)."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from busagents_flight.chat import ChatGateway, affected_passengers, conversation_of
from busagents_flight.data import generate
from busagents_travel import PassengerAsked, PassengerNotified

from busagents import Bus

DAY = generate(flights=12, passengers=300, seed=11)


async def test_a_question_from_the_page_is_a_passenger_asked_in_the_passengers_conversation(bus: Bus) -> None:
    async with ChatGateway(bus) as gateway, aiohttp.ClientSession() as http:
        async with (
            bus.expect(PassengerAsked) as asked,
            http.ws_connect(f"{gateway.url}ws?passenger=P-1") as ws,
        ):
            ready = await ws.receive_json(timeout=10)
            assert ready == {"kind": "ready", "passenger_id": "P-1", "conversation_id": "chat-P-1"}
            await ws.send_str(json.dumps({"text": "  where is my bag?  "}))
            echoed = await ws.receive_json(timeout=10)
        question, envelope = asked.message.body, asked.message.envelope
        assert question.text == "where is my bag?" == echoed["text"]
        assert question.conversation_id == conversation_of("P-1") == envelope.conversation_id
        assert question.passenger_id == "P-1" and question.channel == "chat"
        assert len(question.question_id) == 32 and int(question.question_id, 16) >= 0
        assert echoed["question_id"] == question.question_id
        assert envelope.sender == "flight-chat"


@pytest.mark.parametrize("passenger", ["", "a.b", "x>", "a b", "p" * 65])
async def test_a_passenger_id_that_is_not_a_subject_token_is_refused(bus: Bus, passenger: str) -> None:
    async with ChatGateway(bus) as gateway, aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}ws", params={"passenger": passenger}) as response:
            assert response.status == 400
            assert "letters, digits" in await response.text()


async def test_the_page_suggests_passengers_of_the_day_whose_flight_is_disrupted(bus: Bus) -> None:
    picks = affected_passengers(DAY)
    assert picks and all(("cancelled" in about or "delayed" in about) for _, about in picks)
    async with ChatGateway(bus, passengers=picks) as gateway, aiohttp.ClientSession() as http:
        async with http.get(gateway.url) as page:
            html = await page.text()
            assert page.status == 200 and "<script>" in html
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained: nothing fetched elsewhere
        async with http.get(f"{gateway.url}passengers") as listed:
            assert [p["passenger_id"] for p in await listed.json()] == [pid for pid, _ in picks]


async def test_a_page_opened_after_a_notice_shows_it_then_the_live_ones(bus: Bus) -> None:
    def notice(n: int) -> PassengerNotified:
        return PassengerNotified(
            disruption_id=f"D{n}",
            decision_id=f"d{n}",
            booking_id="B1",
            passenger_id="P-2",
            action="rebook",
            channel="outbox",
            text=f"notice {n}",
        )

    async with ChatGateway(bus) as gateway, aiohttp.ClientSession() as http:
        async with bus.expect(PassengerNotified):
            await bus.publish(notice(1))
        await bus.flush()
        async with http.ws_connect(f"{gateway.url}ws?passenger=P-2") as ws:
            assert (await ws.receive_json(timeout=10))["kind"] == "ready"
            earlier = await ws.receive_json(timeout=10)
            assert (earlier["kind"], earlier["text"], earlier["action"]) == ("notice", "notice 1", "rebook")
            await bus.publish(notice(2))
            live = await ws.receive_json(timeout=10)
            assert (live["kind"], live["text"]) == ("notice", "notice 2")
            assert live["at"] >= earlier["at"] > 0
