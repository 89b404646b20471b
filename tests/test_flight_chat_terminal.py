"""``busagents chat PASSENGER``: the conversation in a terminal (issue 10's terminal channel), as a
real process against the concierge on a real nats-server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from busagents_flight import ContextAgent
from busagents_flight.concierge import ConciergeAgent
from busagents_flight.data import generate
from busagents_travel import PassengerNotified

from busagents import Bus, NatsServer
from busagents.testing import run_agents

from .test_flight_concierge import P

DAY = generate(40, 600, 23)  # as tests/test_flight_concierge.py: P flies BX137 LHR -> JFK, then BX125, BX113


async def _until(stdout: asyncio.StreamReader, prefix: str, timeout: float = 30.0) -> str:
    """The next line of the chat that starts with ``prefix`` (the lines before it are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            line = (await stdout.readline()).decode()
            assert line, f"busagents chat ended before a {prefix!r} line"
            if line.startswith(prefix):
                return line.rstrip("\n")


async def test_a_traveller_chats_in_a_terminal_follows_up_and_sees_a_notice(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    async with run_agents(bus, ContextAgent(DAY), ConciergeAgent()):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "busagents", "chat", P, "--nats", nats_server.url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        try:
            assert (await _until(proc.stdout, "chatting as")).startswith(f"chatting as {P} (conversation chat-{P})")
            proc.stdin.write(b"What about my flight to JFK?\n")
            await proc.stdin.drain()
            first = await _until(proc.stdout, "assistant:")
            assert "BX137" in first
            assert (await _until(proc.stdout, "    · ")).startswith("    · BX137 LHR->JFK")  # the facts used
            proc.stdin.write(b"and the next one?\n")  # only makes sense with the turn before
            await proc.stdin.drain()
            second = await _until(proc.stdout, "assistant:")
            assert "BX125, departing 15:40" in second
            notice = PassengerNotified(
                disruption_id="BX137#9", decision_id="d-1", booking_id="ZZXDAA02", passenger_id=P,
                action="rebook", channel="outbox", text="Your flight BX137 was cancelled; you are on BX125, seat 14C.",
            )  # fmt: skip
            await bus.publish(notice)  # a proactive notice arrives in the same thread
            assert await _until(proc.stdout, "notice:") == f"notice: {notice.text}"
            proc.stdin.close()  # Ctrl-D: nothing is due, so it ends
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "Traceback" not in err.decode()


async def test_a_passenger_id_that_cannot_be_a_subject_token_is_refused(nats_server: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "chat", "a.b*", "--nats", nats_server.url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "letters, digits, '-' and '_' only" in err.decode()
