"""The chat gateway (busagents_flight.chat) over the test's nats-server: what a page sends and gets,
through its WebSocket (the page itself in a browser: tests/test_flight_chat_browser.py)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from busagents_flight.chat import ChatAgent, ChatGateway, affected_passengers, conversation_of
from busagents_flight.data import generate
from busagents_travel import PassengerAnswered, PassengerAsked, PassengerNotified

from busagents import Bus
from busagents.contract import contract_info
from busagents.swarm.graph import Graph

DAY = generate(flights=12, passengers=300, seed=11)
SMALL_DAY = ("--flights", "8", "--passengers", "200", "--day-seconds", "0")


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


def test_the_chat_agent_may_publish_questions_and_subscribe_to_answers_and_notices_only() -> None:
    perms = Graph([ChatAgent]).permissions()["flight-chat"]
    assert contract_info(PassengerAsked).subscribe_subject in perms["publish"]
    assert {contract_info(c).subscribe_subject for c in (PassengerAnswered, PassengerNotified)} <= set(
        perms["subscribe"]
    )
    assert not any(s.startswith("travel.") and "passenger" not in s for s in perms["subscribe"] + perms["publish"])


def test_busagents_demo_chat_serves_the_page_and_stays_up_after_the_day_until_ctrl_c(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "busagents", "demo", "--chat", "--chat-port", "0", "--quiet", *SMALL_DAY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    assert demo.stdout is not None
    try:
        lines = iter(demo.stdout.readline, "")
        url_line = next(line for line in lines if line.startswith("chat with the assistant:"))
        url = re.search(r"http://127\.0\.0\.1:\d+/", url_line)
        assert url is not None and "passenger" in url_line
        settled = next(line for line in lines if "settled" in line)
        assert "stays up until Ctrl-C" in settled
        with urllib.request.urlopen(url.group(0), timeout=10) as page:  # still serving after the day
            assert b"Flight assistant" in page.read()
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, err
    assert "summary" in out and "interrupted" not in out
    assert "Traceback" not in err
