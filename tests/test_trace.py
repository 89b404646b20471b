"""``busagents trace``: one conversation as a causal tree, from the streams, the dead letters and the log."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import msgspec
from nats.aio.msg import Msg

from busagents import Agent, Bus, Context, command, contract_info, event, on
from busagents.conversation import causal_tree, read_conversation
from busagents.convlog import CONVERSATION_LOG_STREAM, ConversationLog
from busagents.llm import LLMSettings
from busagents.llm.testing import MessagesServer, tool_use
from busagents.observe import Catalog
from busagents.server import NatsServer
from busagents.worker import Worker

from .drain_agent import run_until_serving
from .llm_agents import ContextAgent as LLMContext
from .llm_agents import Disrupted, FindFlights, LLMReasoner, Rebook

_DECISION = {"booking_id": "B1", "flight_id": "F2", "cost": 80.0, "rationale": "F2 arrives first"}


@event("test.trace.ordered", key="order_id")
class Ordered(msgspec.Struct):
    order_id: str


@command("test.trace.pack", key="order_id", durable=True)
class Pack(msgspec.Struct):
    order_id: str


@event("test.trace.packed", key="order_id")
class Packed(msgspec.Struct):
    order_id: str
    boxes: int


class Till(Agent):
    name = "trace-till"
    produces = (Pack,)

    @on(Ordered)
    async def take(self, order: Ordered, ctx: Context) -> Pack:
        return Pack(order_id=order.order_id)


class Packer(Agent):
    name = "trace-packer"
    produces = (Packed,)

    @on(Pack)
    async def pack(self, cmd: Pack, ctx: Context) -> Packed:
        return Packed(order_id=cmd.order_id, boxes=2)


class Shipper(Agent):
    name = "trace-shipper"

    @on(Packed)
    async def ship(self, packed: Packed, ctx: Context) -> None:
        raise ValueError(f"no courier for {packed.boxes} boxes")


async def test_trace_shows_a_three_hop_conversation_with_its_dead_letter(bus: Bus, nats_server: NatsServer) -> None:
    agents = [Till(), Packer(), Shipper()]
    async with Worker(agents, bus, drain_timeout=10, conversation_log=ConversationLog(max_age=600)):
        dead = await bus.nc.subscribe("busagents.dlq.trace-shipper")
        await bus.flush()
        await bus.publish(Ordered(order_id="o-7"), conversation_id="conv-trace")
        await bus.publish(Ordered(order_id="o-8"), conversation_id="conv-elsewhere")
        letters: list[Msg] = [await dead.next_msg(timeout=10), await dead.next_msg(timeout=10)]
        await dead.unsubscribe()
    assert {m.headers["Ba-Conversation-Id"] for m in letters if m.headers} == {"conv-trace", "conv-elsewhere"}

    kept = await read_conversation(bus, "conv-trace", Catalog([Ordered, Pack, Packed]))
    (root,) = causal_tree(kept)
    assert [s.stream for s in kept][:1] == [CONVERSATION_LOG_STREAM]  # the core root is kept by the log
    assert root.seen.contract == contract_info(Ordered).name and root.seen.body == {"order_id": "o-7"}
    (pack,) = root.children
    assert (pack.seen.contract, pack.seen.sender) == (contract_info(Pack).name, "trace-till")
    (packed,) = pack.children
    assert (packed.seen.sender, packed.seen.body["boxes"]) == ("trace-packer", 2)
    (letter,) = packed.children
    assert letter.seen.dead_letter is not None
    assert letter.seen.dead_letter["agent"] == "trace-shipper"
    assert "no courier for 2 boxes" in letter.seen.dead_letter["reason"]
    assert all(not hop.orphan for hop in (root, pack, packed, letter))

    tree = json.loads(await _trace(nats_server.url, "conv-trace", "--json"))
    (json_root,) = tree["roots"]
    chain = [json_root]
    while chain[-1]["caused"]:
        (nxt,) = chain[-1]["caused"]
        chain.append(nxt)
    assert [hop["sender"] for hop in chain[:3]] == [None, "trace-till", "trace-packer"]
    assert chain[3]["dead_letter"]["stage"] == "handler"
    assert all(hop["after_seconds"] >= 0 for hop in chain[1:])

    text = await _trace(nats_server.url, "conv-trace")
    for expected in ("conversation conv-trace", "trace-till", "trace-packer", "DEAD LETTER", "no courier"):
        assert expected in text, text
    assert "o-8" not in text  # the other conversation's messages are not in this tree


async def test_trace_of_an_unknown_conversation_says_what_is_kept(nats_server: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "trace", "no-such-conv", "--nats", nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"nothing kept of conversation 'no-such-conv'" in err and b"BUSAGENTS_CONVERSATION_LOG=1" in err


async def _trace(url: str, conversation: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "trace", conversation, "--nats", url, "--width", "200", *args),
        stdout=asyncio.subprocess.PIPE,
        env=_wide(),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    return out.decode()


def _wide() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "250"}  # rich wraps at the terminal's width


async def test_trace_marks_the_decision_a_model_made_and_keeps_the_queries_it_sent(
    bus: Bus, nats_server: NatsServer, messages_server: MessagesServer
) -> None:
    messages_server.script(
        tool_use("find_flights", {"origin": "LHR", "destination": "JFK"}, input_tokens=100, output_tokens=20),
        tool_use("decide", _DECISION, input_tokens=300, output_tokens=40),
    )
    reasoner = LLMReasoner(LLMSettings.for_agent("test_llm_reasoner", max_retries=0), messages_server)
    log = ConversationLog(max_age=600)
    async with Worker([reasoner, LLMContext()], bus, drain_timeout=10, conversation_log=log):
        async with bus.expect(Rebook, where=lambda r: r.booking_id == "B1", timeout=15):
            await bus.publish(Disrupted(booking_id="B1", origin="LHR", destination="JFK"), conversation_id="conv-llm")

    (root,) = causal_tree(await read_conversation(bus, "conv-llm", Catalog([Disrupted, FindFlights, Rebook])))
    by_contract = {hop.seen.contract: hop.seen for _, hop in root.walk()}
    # the model's query went through the log (no_ack: the requester still got the context agent's answer)
    assert by_contract[contract_info(FindFlights).name].body == {"origin": "LHR", "destination": "JFK"}
    rebook = by_contract[contract_info(Rebook).name]
    assert rebook.llm == "claude-test calls=2 tokens=460 source=model"
    assert by_contract[contract_info(FindFlights).name].llm is None  # asked during the decision, not decided by it
    text = await _trace(nats_server.url, "conv-llm")
    assert "LLM claude-test calls=2" in text, text


async def test_swarm_up_with_the_conversation_log_keeps_its_agents_core_subjects(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\n')
    args = ("swarm", "up", str(swarm), "--nats", nats_server.url, "--conversation-log")
    code, text = await run_until_serving(bus, *args, replicas=1)
    assert code == 0, text
    log = (await bus.js.stream_info(CONVERSATION_LOG_STREAM)).config
    assert set(log.subjects or []) == {"test.drain.job", "test.drain.started", "test.drain.done"}
    assert log.no_ack and log.max_age == 3600 and log.max_bytes == 256 * 1024 * 1024
