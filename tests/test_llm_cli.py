"""``busagents llm watch|approve|reject`` against a held decision, over a real nats-server."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from busagents import Bus, Context, NatsServer, UndeclaredContractError
from busagents.llm import ApprovalGate, ApprovalRequested

from .llm_agents import LLMReasoner, Rebook


async def cli(*args: str, returncode: int = 0) -> str:
    """Run ``busagents llm ARGS``; its stdout (its stderr when a failure is expected)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "llm", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == returncode, err.decode()
    return out.decode() if returncode == 0 else err.decode()


def context(bus: Bus) -> Context:
    agent = LLMReasoner.__new__(LLMReasoner)  # only its name and declarations are needed here
    return Context(agent, bus, logging.getLogger("test"))


async def test_a_held_decision_is_approved_from_the_command_line(bus: Bus, nats_server: NatsServer) -> None:
    gate = ApprovalGate(100.0, timeout=30)
    decision = Rebook("B7", "F2", 250.0, "the only seat left")
    async with bus.expect(ApprovalRequested, subject="busagents.llm.approval.requested.*") as asked:
        held = asyncio.create_task(gate.ask(context(bus), decision, cost=250.0, summary="rebook B7"))
    request = asked.message.body
    assert not held.done()
    said = await cli("approve", request.request_id, "--nats", nats_server.url, "--by", "ops-lead", "--note", "ok")
    answer = await asyncio.wait_for(held, 10)
    assert answer is not None and answer.approved and (answer.by, answer.note) == ("ops-lead", "ok")
    assert said.strip() == f"approved {request.request_id} as ops-lead"
    # the gate took its answer and stopped waiting: a second answer, or a typo, reaches nobody
    again = await cli("reject", request.request_id, "--note", "late", "--nats", nats_server.url, returncode=1)
    assert f"no agent is waiting for approval {request.request_id}" in again
    typo = await cli("approve", "no-such-request", "--nats", nats_server.url, returncode=1)
    assert "no agent is waiting for approval no-such-request: unknown, expired or already answered" in typo
    assert "Traceback" not in typo


async def test_watch_shows_the_request_and_reject_refuses_it(bus: Bus, nats_server: NatsServer) -> None:
    gate = ApprovalGate(100.0, timeout=30)
    watcher = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "llm", "watch", "--count", "1", "--nats", nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert watcher.stderr is not None
    which = await asyncio.wait_for(watcher.stderr.readline(), 60)
    assert which == f"nats: {nats_server.url} (from --nats)\n".encode()
    ready = await asyncio.wait_for(watcher.stderr.readline(), 60)  # subscribed
    assert ready.startswith(b"watching")
    held = asyncio.create_task(gate.ask(context(bus), Rebook("B8", "F3", 900.0, "business"), cost=900.0))
    out, _ = await asyncio.wait_for(watcher.communicate(), 60)
    shown = out.decode()
    request_id = shown.split()[1]
    assert f"approval {request_id} from test_llm_reasoner" in shown and '"flight_id": "F3"' in shown
    await cli("reject", request_id, "--nats", nats_server.url, "--by", "ops-lead", "--note", "too dear")
    answer = await asyncio.wait_for(held, 10)
    assert answer is not None and not answer.approved and answer.note == "too dear"


async def test_an_agent_that_does_not_declare_what_it_awaits_cannot_ask(bus: Bus) -> None:
    class Undeclared(LLMReasoner):
        awaits = ()  # type: ignore[assignment]  # it forgot ApprovalDecided

    ctx = Context(Undeclared.__new__(Undeclared), bus, logging.getLogger("test"))
    with pytest.raises(UndeclaredContractError, match=r"add it to Undeclared\.awaits"):
        await ApprovalGate(100.0, timeout=30).ask(ctx, Rebook("B9", "F4", 900.0, "business"), cost=900.0)
