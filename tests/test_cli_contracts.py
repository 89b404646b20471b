"""``busagents publish`` and ``busagents request``: contracts from a shell, validated before they are sent."""

from __future__ import annotations

import asyncio
import json
import sys
from importlib.metadata import EntryPoint

import msgspec
import pytest
from click.testing import CliRunner, Result

from busagents import Agent, Bus, ConfigError, Context, event, on, query
from busagents.plugins import AGENTS_GROUP, find_contract
from busagents.server import NatsServer
from busagents.testing import run_agents

HERE = __name__  # tests.test_cli_contracts: importable by a child started in the repository


class Pong(msgspec.Struct):
    text: str
    length: int


@query("test.cli.ping", reply=Pong)
class Ping(msgspec.Struct):
    text: str


@query("test.cli.boom", reply=Pong)
class Boom(msgspec.Struct):
    text: str


@query("test.cli.unanswered", reply=Pong)
class Unanswered(msgspec.Struct):
    text: str


@event("test.cli.noted", key="item")
class Noted(msgspec.Struct):
    item: str
    count: int


@event("test.cli.acknowledged")
class Acknowledged(msgspec.Struct):
    item: str
    count: int


class Echo(Agent):
    name = "cli-echo"
    produces = (Acknowledged,)

    @on(Ping)
    async def ping(self, q: Ping, ctx: Context) -> Pong:
        return Pong(text=f"pong {q.text}", length=len(q.text))

    @on(Boom)
    async def boom(self, q: Boom, ctx: Context) -> Pong:
        raise RuntimeError(f"cannot answer {q.text}")

    @on(Noted)
    async def noted(self, msg: Noted, ctx: Context) -> Acknowledged:
        return Acknowledged(item=msg.item, count=msg.count)


async def cli(*args: str, stdin: str | None = None) -> Result:
    """The command in this process (on a thread: it runs its own event loop)."""
    from busagents.cli import cli as command

    return await asyncio.to_thread(CliRunner().invoke, command, list(args), input=stdin)


async def test_request_prints_the_typed_reply_as_json(nats_server: NatsServer, bus: Bus) -> None:
    async with run_agents(bus, Echo()):
        proc = await asyncio.create_subprocess_exec(  # as a user runs it
            *(sys.executable, "-m", "busagents", "request", f"{HERE}:Ping", '{"text": "hello"}'),
            *("--nats", nats_server.url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"text": "pong hello", "length": 5}
    assert "Traceback" not in err.decode()


async def test_request_reads_the_body_from_stdin_and_names_the_query_fully_qualified(
    nats_server: NatsServer, bus: Bus
) -> None:
    async with run_agents(bus, Echo()):
        result = await cli("request", f"{HERE}.Ping", "-", "--nats", nats_server.url, stdin='{"text": "abc"}')
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"text": "pong abc", "length": 3}


async def test_request_says_what_the_responder_failed_with_and_when_nobody_answers(
    nats_server: NatsServer, bus: Bus
) -> None:
    async with run_agents(bus, Echo()):
        failed = await cli("request", f"{HERE}:Boom", '{"text": "x"}', "--nats", nats_server.url)
        unanswered = await cli("request", f"{HERE}:Unanswered", '{"text": "x"}', "--nats", nats_server.url)
    assert failed.exit_code == 1
    assert "the answering agent failed" in str(failed.exception)
    assert "cannot answer x" in str(failed.exception)
    assert unanswered.exit_code == 1
    assert str(unanswered.exception) == "no responder: no agent answers Unanswered on test.cli.unanswered"


async def test_publish_sends_an_event_the_agent_handles_in_the_given_conversation(
    nats_server: NatsServer, bus: Bus
) -> None:
    async with run_agents(bus, Echo()):
        async with bus.expect(Acknowledged, where=lambda m: m.item == "seat-1") as got:
            result = await cli(
                "publish", f"{HERE}:Noted", '{"item": "seat-1", "count": 2}', "--conversation", "conv-7",
                "--nats", nats_server.url,
            )  # fmt: skip
    assert result.exit_code == 0, result.output
    envelope = got.message.envelope
    assert got.message.body == Acknowledged(item="seat-1", count=2)
    assert envelope.conversation_id == "conv-7"  # the agent's output joined the conversation
    assert envelope.causation_id is not None
    assert result.stdout.strip() == (
        f"published Noted id={envelope.causation_id} subject=test.cli.noted.seat-1 conversation=conv-7"
    )


async def test_an_invalid_body_names_the_field_and_sends_nothing(nats_server: NatsServer, bus: Bus) -> None:
    sub = await bus.nc.subscribe("test.cli.noted.>")
    await bus.flush()
    try:
        bad = await cli("publish", f"{HERE}:Noted", '{"item": "seat-1", "count": "two"}', "--nats", nats_server.url)
        good = await cli("publish", f"{HERE}:Noted", '{"item": "seat-2", "count": 2}', "--nats", nats_server.url)
        first = await sub.next_msg(timeout=5)  # the valid one, sent after the invalid one: nothing came before it
    finally:
        await sub.unsubscribe()
    assert bad.exit_code == 1
    assert str(bad.exception) == "invalid Noted, nothing sent: Noted: Expected `int`, got `str` - at `$.count`"
    assert good.exit_code == 0, good.output
    assert json.loads(first.data) == {"item": "seat-2", "count": 2}
    headers = first.headers or {}
    assert (headers["Ba-Contract"], headers["Ba-Version"], headers["Ba-Sender"]) == ("Noted", "1", "busagents-cli")
    assert headers["Ba-Conversation-Id"] == headers["Nats-Msg-Id"]  # a new conversation, rooted in this message
    assert int(headers["Ba-Sent-At"]) > 0


async def test_publish_refuses_a_query_and_request_an_event() -> None:
    published = await cli("publish", f"{HERE}:Ping", '{"text": "x"}', "--nats", "nats://127.0.0.1:1")
    requested = await cli("request", f"{HERE}:Noted", '{"item": "a", "count": 1}', "--nats", "nats://127.0.0.1:1")
    assert "Ping is a query: send it with 'busagents request" in str(published.exception)
    assert "Noted is an event, not a query" in str(requested.exception)


def test_contracts_are_found_by_name_among_the_installed_plugins() -> None:
    from busagents_travel.messages import BookingsOnFlightReply, RebookPassenger

    assert find_contract("RebookPassenger") is RebookPassenger
    assert find_contract("busagents_travel.messages:RebookPassenger") is RebookPassenger
    assert find_contract("busagents_travel.messages.RebookPassenger") is RebookPassenger
    assert find_contract("BookingsOnFlightReply") is BookingsOnFlightReply  # a query's reply too
    with pytest.raises(ConfigError, match=r"no contract named 'RebookPasenger' among .*RebookPassenger"):
        find_contract("RebookPasenger")


@query("test.cli.ping.other", reply=Pong, name="Ping")
class OtherPing(msgspec.Struct):
    text: str


class OtherEcho(Agent):
    @on(OtherPing)
    async def ping(self, q: OtherPing, ctx: Context) -> Pong:
        return Pong(text=q.text, length=0)


def test_an_ambiguous_contract_name_lists_the_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    from busagents import plugins

    found = {
        "echo": EntryPoint("echo", f"{HERE}:Echo", AGENTS_GROUP),
        "other": EntryPoint("other", f"{HERE}:OtherEcho", AGENTS_GROUP),
    }
    monkeypatch.setattr(plugins, "available_agents", lambda: found)
    with pytest.raises(ConfigError) as raised:
        find_contract("Ping")
    assert str(raised.value) == (
        f"contract name 'Ping' is ambiguous: {HERE}:OtherPing, {HERE}:Ping; give one of these fully qualified names"
    )
    assert find_contract("Noted") is Noted
