"""The AsyncAPI document: what it promises (required headers, replies, servers, parameters, dead
letters), the official parser's verdict on it, and live traffic that keeps the promise."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.reasoner import ReasonerAgent
from busagents_travel import FlightCancelled
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


class _Traffic:
    """Every message on a document's channels, and each reply to a query, as a second connection sees them."""

    def __init__(self, doc: dict[str, Any], done: Callable[[_Traffic], bool]) -> None:
        self.doc = doc
        self.messages: dict[str, Any] = doc["components"]["messages"]
        self.patterns = {
            name: _pattern(channel["address"])
            for name, channel in doc["channels"].items()
            if channel["address"] is not None
        }
        self.captured: list[tuple[str, Msg]] = []  # (channel, message)
        self.replies: list[tuple[str, Msg]] = []  # (query channel, reply)
        self._asked: dict[str, str] = {}  # reply subject of a captured query -> its channel
        self._done = done
        self.finished = asyncio.Event()

    async def capture(self, msg: Msg) -> None:
        asked = self._asked.pop(msg.subject, None)
        if asked is not None:
            self.replies.append((asked, msg))
        for name, pattern in self.patterns.items():
            if pattern.fullmatch(msg.subject):
                self.captured.append((name, msg))
                if f"{name}-reply" in self.doc["channels"] and msg.reply:
                    self._asked[msg.reply] = name
        if self._done(self):
            self.finished.set()

    def channels(self) -> set[str]:
        return {name for name, _ in self.captured}

    def assert_required_headers(self) -> None:
        """Every captured message has the headers its channel's message marks required; every reply its reply's."""
        for name, msg in self.captured:
            (ref,) = self.doc["channels"][name]["messages"].values()
            self._assert_has(self.messages[_ref_name(ref)], msg, f"{name} on {msg.subject}")
        for asked, msg in self.replies:
            failed = msg.headers is not None and "Ba-Error" in msg.headers
            names = [_ref_name(r) for r in self.doc["channels"][f"{asked}-reply"]["messages"].values()]
            (name,) = [n for n in names if n.endswith("Failed") == failed]
            self._assert_has(self.messages[name], msg, f"reply {name} to {asked}")
            if not failed:
                assert msg.headers is not None and msg.headers["Ba-Contract"] == name

    @staticmethod
    def _assert_has(message: dict[str, Any], msg: Msg, what: str) -> None:
        missing = _required(message) - set(msg.headers or {})
        assert not missing, f"{what} lacks required headers {sorted(missing)}"


def _ref_name(ref: dict[str, str]) -> str:
    return ref["$ref"].rsplit("/", 1)[-1]


@asynccontextmanager
async def _watching(nats_server: NatsServer, traffic: _Traffic) -> AsyncIterator[None]:
    spy = await nats.connect(nats_server.url)
    try:
        await spy.subscribe(">", cb=traffic.capture)
        await spy.flush()
        yield
    finally:
        await spy.close()


def _test_swarm_done(traffic: _Traffic) -> bool:
    captured = traffic.captured
    letters = {m.headers.get("Ba-Dlq-Agent") for c, m in captured if c == "dead-letters" and m.headers}
    errors = sum(1 for _, m in traffic.replies if m.headers and "Ba-Error" in m.headers)
    finished = any(c == "Finished" for c, _ in captured)
    return finished and letters >= {"actor", "pricer", "watcher"} and 1 <= errors < len(traffic.replies)


async def test_live_traffic_carries_every_required_header(bus: Bus, nats_server: NatsServer) -> None:
    traffic = _Traffic(_document(), _test_swarm_done)
    async with _watching(nats_server, traffic), run_agents(bus, *(agent() for agent in SWARM)):
        for item in ("a", "poison", "unpriced"):  # a price and an act; a dead act; a failed query
            await bus.publish(Seen(item=item))
        await asyncio.wait_for(traffic.finished.wait(), timeout=20)
    assert {"Seen", "Act", "PriceOf", "Finished", "dead-letters"} <= traffic.channels()
    traffic.assert_required_headers()


def _flight_done(traffic: _Traffic) -> bool:
    answered = {asked for asked, _ in traffic.replies}
    return {"DisruptionAssessed", "RebookGroup"} <= traffic.channels() and "BookingsOnFlight" in answered


async def test_the_flight_agents_traffic_carries_every_required_header(bus: Bus, nats_server: NatsServer) -> None:
    day = generate(flights=8, passengers=200, seed=3)
    flight = max(day.flights, key=lambda f: sum(1 for b in day.bookings if b.legs[0].flight_id == f.flight_id))
    traffic = _Traffic(Graph([ContextAgent, ReasonerAgent]).asyncapi(), _flight_done)
    async with _watching(nats_server, traffic), run_agents(bus, ContextAgent(day), ReasonerAgent("offline")):
        await bus.publish(
            FlightCancelled(
                disruption_id=f"{flight.flight_id}#1", flight_id=flight.flight_id, number=flight.number,
                origin=flight.origin, destination=flight.destination, reason="crew",
                observed_at=flight.departure - 7200,
            )
        )  # fmt: skip
        await asyncio.wait_for(traffic.finished.wait(), timeout=30)
    assert {"FlightCancelled", "BookingsOnFlight", "DisruptionAssessed", "RebookGroup"} <= traffic.channels()
    traffic.assert_required_headers()
