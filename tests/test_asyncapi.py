"""The AsyncAPI document: what it promises (required headers, replies, servers, parameters, dead
letters), the official parser's verdict on it, and live traffic that keeps the promise."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from busagents import Agent, Bus, ConfigError, Context, PermanentError, command, event, on, query
from busagents.plugins import load_agent
from busagents.server import NatsServer
from busagents.swarm import Graph, load_swarm
from busagents.testing import run_agents

ROOT = Path(__file__).resolve().parent.parent
PARSER = ROOT / "tests" / "asyncapi"


@event("test.asyncapi.seen", key="item")
class Seen(msgspec.Struct):
    item: str


@command("test.asyncapi.act", durable=True)
class Act(msgspec.Struct):
    item: str
    cents: int


@event("test.asyncapi.done", key="item")
class Finished(msgspec.Struct):
    item: str


class Price(msgspec.Struct):
    cents: int


@query("test.asyncapi.price", reply=Price)
class PriceOf(msgspec.Struct):
    item: str


class Watcher(Agent):
    produces = (Act, PriceOf)

    @on(Seen)
    async def seen(self, msg: Seen, ctx: Context) -> Act:
        price = await ctx.request(PriceOf(item=msg.item), timeout=5.0)
        return Act(item=msg.item, cents=price.cents)


class Actor(Agent):
    produces = (Finished,)

    @on(Act)
    async def act(self, msg: Act, ctx: Context) -> Finished:
        if msg.item == "poison":
            raise PermanentError("poison")  # dead-lettered at once, not retried
        return Finished(item=msg.item)


class Pricer(Agent):
    @on(PriceOf)
    async def price(self, q: PriceOf, ctx: Context) -> Price:
        if q.item == "unpriced":
            raise LookupError("no price")
        return Price(cents=100)


SWARM = (Watcher, Actor, Pricer)


def _document() -> dict[str, Any]:
    return Graph(list(SWARM)).asyncapi(title="test")


def _required(message: dict[str, Any]) -> set[str]:
    return set(message["headers"]["required"])


def test_required_envelope_headers_are_marked_and_fixed_per_contract() -> None:
    doc = _document()
    act = doc["components"]["messages"]["Act"]
    assert _required(act) == {"Nats-Msg-Id", "Ba-Contract", "Ba-Version", "Ba-Conversation-Id", "Ba-Sent-At"}
    assert act["headers"]["properties"]["Ba-Contract"]["const"] == "Act"
    assert act["headers"]["properties"]["Ba-Version"]["const"] == "1"
    assert "Ba-Causation-Id" in act["headers"]["properties"]  # sent when there is a cause, so not required


def test_query_replies_have_headers_and_go_to_the_requesters_inbox() -> None:
    doc = _document()
    reply_channel = doc["channels"]["PriceOf-reply"]
    assert reply_channel["address"] is None  # the NATS reply subject of each request
    assert set(reply_channel["messages"]) == {"Price", "PriceOfFailed"}
    assert "Price" not in doc["channels"]["PriceOf"]["messages"]  # no longer on the request's channel
    price = doc["components"]["messages"]["Price"]
    assert {"Ba-Causation-Id", "Ba-Sender", "Nats-Msg-Id"} <= _required(price)
    assert _required(doc["components"]["messages"]["PriceOfFailed"]) == {"Ba-Error"}
    for name in ("pricer.receive.PriceOf", "watcher.send.PriceOf"):  # the answering side and the asking side
        reply = doc["operations"][name]["reply"]
        assert reply["channel"] == {"$ref": "#/channels/PriceOf-reply"}
        assert reply["x-busagents-reply-to"] == "nats-reply-subject"


def test_servers_come_from_the_nats_url_without_credentials() -> None:
    graph = Graph(list(SWARM))
    assert graph.asyncapi()["servers"] == {"nats": {"host": "127.0.0.1:4222", "protocol": "nats"}}
    servers = graph.asyncapi(nats_url="nats://u:secret@a.example:4333, tls://b.example")["servers"]
    assert servers["nats"] == {"host": "a.example:4333", "protocol": "nats"}
    assert servers["nats-2"]["host"] == "b.example:4222"
    assert "secret" not in json.dumps(servers)
    with pytest.raises(ConfigError, match="invalid NATS URL"):
        graph.asyncapi(nats_url="nats://host:port")


def test_parameters_have_a_location_and_dead_letters_a_channel() -> None:
    doc = _document()
    assert doc["channels"]["Seen"]["parameters"]["item"]["location"] == "$message.payload#/item"
    dlq = doc["channels"]["dead-letters"]
    assert dlq["address"] == "busagents.dlq.{agent}"
    assert dlq["parameters"]["agent"]["enum"] == ["actor", "pricer", "watcher"]
    letter = doc["components"]["messages"]["DeadLetter"]
    assert _required(letter) == {"Nats-Msg-Id", "Ba-Dlq-Reason", "Ba-Dlq-Subject", "Ba-Dlq-Agent", "Ba-Dlq-Stage"}
    assert doc["operations"]["actor.send.DeadLetter"]["channel"] == {"$ref": "#/channels/dead-letters"}


@pytest.fixture(scope="module")
def diagnostics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    """The official @asyncapi/parser's diagnostics of the flight swarm's, the test swarm's and a broken
    document, by name (one node process for the three)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the official @asyncapi/parser (npm) cannot run")
    if not (PARSER / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail(f"@asyncapi/parser is not installed in {PARSER}: run `make test` (npm ci there)")
    flight = [load_agent(target) for target in load_swarm(ROOT / "deploy/flight-swarm.toml").targets().values()]
    broken = _document()
    broken["operations"]["actor.receive.Act"]["channel"] = {"$ref": "#/channels/Missing"}
    docs = {"flight": Graph(flight).asyncapi(title="flight"), "test": _document(), "broken": broken}
    folder = tmp_path_factory.mktemp("asyncapi")
    for name, doc in docs.items():
        (folder / f"{name}.json").write_text(json.dumps(doc))
    files = [str(folder / f"{name}.json") for name in docs]
    done = subprocess.run(
        [node, str(PARSER / "validate.mjs"), *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, list[dict[str, str]]] = {name: [] for name in docs}
    for line in done.stdout.splitlines():
        diagnostic = json.loads(line)
        found[Path(diagnostic["file"]).stem].append(diagnostic)
    return found


@pytest.mark.parametrize("swarm", ["flight", "test"])
def test_the_official_parser_finds_no_error(swarm: str, diagnostics: dict[str, list[dict[str, str]]]) -> None:
    errors = [d for d in diagnostics[swarm] if d["severity"] == "error"]
    assert errors == [], errors


def test_the_official_parser_reports_a_broken_document(diagnostics: dict[str, list[dict[str, str]]]) -> None:
    assert any(d["severity"] == "error" and "Missing" in d["message"] + d["path"] for d in diagnostics["broken"]), (
        diagnostics["broken"]
    )


def _pattern(address: str) -> re.Pattern[str]:
    """A channel address as a regex over concrete subjects: each ``{parameter}`` is one token."""
    parts = re.split(r"(\{[^}]+\})", address)
    return re.compile("".join("[^.]+" if p.startswith("{") else re.escape(p) for p in parts))


async def test_live_traffic_carries_every_required_header(bus: Bus, nats_server: NatsServer) -> None:
    doc = _document()
    messages = doc["components"]["messages"]
    channels = {
        name: (_pattern(ch["address"]), [messages[m] for m in ch["messages"]])
        for name, ch in doc["channels"].items()
        if ch["address"] is not None
    }
    requests: set[str] = set()  # reply subjects of captured queries
    captured: list[tuple[str, Msg]] = []  # (channel, message)
    replies: list[Msg] = []
    done = asyncio.Event()

    def complete() -> bool:
        letters = {m.headers.get("Ba-Dlq-Agent") for c, m in captured if c == "dead-letters" and m.headers}
        finished = any(c == "Finished" for c, _ in captured)
        errors = sum(1 for m in replies if m.headers and "Ba-Error" in m.headers)
        return finished and letters >= {"actor", "pricer", "watcher"} and errors >= 1 and len(replies) > errors

    async def capture(msg: Msg) -> None:
        if msg.subject in requests:
            replies.append(msg)
        for name, (pattern, _) in channels.items():
            if pattern.fullmatch(msg.subject):
                captured.append((name, msg))
                if name == "PriceOf" and msg.reply:
                    requests.add(msg.reply)
        if complete():
            done.set()

    spy = await nats.connect(nats_server.url)
    try:
        await spy.subscribe(">", cb=capture)
        await spy.flush()
        async with run_agents(bus, *(agent() for agent in SWARM)):
            for item in ("a", "poison", "unpriced"):
                await bus.publish(Seen(item=item))
            await asyncio.wait_for(done.wait(), timeout=20)
    finally:
        await spy.close()

    seen_channels = {name for name, _ in captured}
    assert {"Seen", "Act", "PriceOf", "Finished", "dead-letters"} <= seen_channels
    for name, msg in captured:
        (message,) = channels[name][1]
        missing = _required(message) - set(msg.headers or {})
        assert not missing, f"{name} on {msg.subject} lacks required headers {missing}"
    by_name = {m["name"]: m for m in (messages["Price"], messages["PriceOfFailed"])}
    for msg in replies:
        message = by_name["PriceOfFailed" if msg.headers and "Ba-Error" in msg.headers else "Price"]
        missing = _required(message) - set(msg.headers or {})
        assert not missing, f"reply {message['name']} lacks required headers {missing}"
        assert msg.headers is not None and msg.headers.get("Ba-Contract", "Price") == "Price"
