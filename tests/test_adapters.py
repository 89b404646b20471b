"""The adapters' assumptions about nats-py and anthropic: a release that breaks one fails here, by name.

busagents/_natspy.py is the one module that touches nats-py's internals; anthropic needs
none (the SDK middleware names are public). Run the suite against the newest releases with
``make test-newest``; when a test here fails there, the message says what to look at.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anthropic
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.protocol.parser import Parser

from busagents import _natspy
from busagents._natspy import BusClient, buffered, heartbeat_check_died, pending_queue, taken
from busagents.server import NatsServer

PACKAGE = Path(_natspy.__file__).parent

# nats-py functions the adapter copies from or relies on the inside of, as of nats-py 2.16.0.
ADAPTED = {
    # copied, with its subject patterns and decoding changed
    Parser.parse: "7d6165f1766cccd1",
    # checks subject and payload size, then calls _send_publish: BusClient.publish converts its errors
    Client.publish: "97d776c391adfd8b",
    # BusClient._send_publish does its tail itself and sizes its header blocks like it
    Client._send_publish: "300b534f8eabee74",
    # replaced: it wrote PING ahead of the buffered commands
    Client._send_ping: "d57b2f820443afb4",
    # copied, skipping the future of a flush given up on
    Client._process_pong: "ee4c4d01a16de074",
}


@pytest.mark.parametrize("function", list(ADAPTED), ids=lambda f: f.__qualname__)
def test_the_nats_py_code_the_adapter_copies_is_the_version_it_was_adapted_from(function: Any) -> None:
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
    assert digest == ADAPTED[function], (
        f"nats-py {version('nats-py')} changed {function.__qualname__}: compare it with its use in "
        "busagents/_natspy.py, adapt the copy, then update the digest here"
    )


def test_the_client_internals_the_adapter_uses_exist() -> None:
    nc = BusClient()
    assert isinstance(nc._ps, Parser)
    assert isinstance(nc._max_payload, int)
    assert isinstance(nc._pongs, list)
    assert isinstance(nc._pongs_received, int) and isinstance(nc._pings_outstanding, int)
    assert isinstance(nc.stats, dict) and {"out_msgs", "out_bytes"} <= set(nc.stats)
    for name in ("_send_command", "_flush_pending", "_process_err", "_process_ping", "_process_pong", "_process_info"):
        assert inspect.iscoroutinefunction(getattr(Client, name)), name
    assert hasattr(nc, "_flush_queue")
    parameters = list(inspect.signature(Client._process_msg).parameters)
    assert parameters == ["self", "sid", "subject", "reply", "data", "headers"]
    assert list(inspect.signature(Client._process_headers).parameters) == ["self", "headers"]


class Recorder:
    """What a parser asks of its client, in order (a stand-in for the client's callbacks, not for NATS)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.calls.append(("msg", sid, subject, reply, data, headers))

    async def _process_err(self, message: str) -> None:
        self.calls.append(("err", message))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))


def msg(subject: bytes, sid: int, payload: bytes, reply: bytes = b"") -> bytes:
    return b"MSG %s %d %s%d\r\n%s\r\n" % (subject, sid, reply + b" " if reply else b"", len(payload), payload)


def hmsg(subject: bytes, sid: int, block: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    sizes = b"%d %d" % (len(block), len(block) + len(payload))
    return b"HMSG %s %d %s%s\r\n%s%s\r\n" % (subject, sid, reply + b" " if reply else b"", sizes, block, payload)


TRAFFIC = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n',
        b"+OK\r\n",
        msg(b"a.b", 1, b"hello"),
        msg(b"a.b", 12, b"", reply=b"_INBOX.x.y"),
        hmsg(b"a.b", 3, b"NATS/1.0\r\n\r\n", b"hi"),
        hmsg(b"$JS.x", 4, b"NATS/1.0\r\nK: v\r\n\r\n", b"ok", reply=b"$JS.ACK.S.C.1.2.3.4.0"),
        hmsg(b"_INBOX.z", 5, b"NATS/1.0 503\r\n\r\n", b""),
        msg("caf\u00e9.\u00fc".encode(), 2, b"ok"),
        b"PING\r\n",
        b"PONG\r\n",
        b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n",
        msg(b"big", 6, b"x" * 3000),
    ]
)


async def parse_in_chunks(parser: Parser, size: int) -> None:
    for start in range(0, len(TRAFFIC), size):
        await parser.parse(TRAFFIC[start : start + size])


@pytest.mark.parametrize("chunk", [len(TRAFFIC), 1, 7, 1024])
async def test_the_adapted_parser_reads_ordinary_traffic_exactly_as_nats_py_does(chunk: int) -> None:
    theirs, ours = Recorder(), Recorder()
    await parse_in_chunks(Parser(theirs), chunk)
    await parse_in_chunks(_natspy._Parser(ours), chunk)
    assert ours.calls == theirs.calls
    assert len(ours.calls) == 11  # every command but +OK


async def test_reading_a_subscription_directly(nats_server: NatsServer) -> None:
    nc = BusClient()
    await nc.connect(nats_server.url)
    try:
        sub = await nc.subscribe("test.adapters.direct")
        for n in range(3):
            await nc.publish("test.adapters.direct", b"x" * (n + 1))
        await nc.flush()  # the server sent them before its PONG
        assert [m.data for m in buffered(sub)] == [b"x", b"xx", b"xxx"]
        assert sub.pending_bytes == 6
        msg = await pending_queue(sub).get()
        taken(sub, msg)
        assert msg.data == b"x"
        assert sub.pending_bytes == 5  # nats-py's slow-consumer accounting sees it gone
        assert [m.data for m in buffered(sub)] == [b"xx", b"xxx"]
    finally:
        await nc.close()


class Tick(msgspec.Struct):
    n: int


async def test_an_ordered_consumer_has_the_heartbeat_check_the_view_watchdog_reads(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await js.add_stream(api.StreamConfig(name="TEST_ADAPTERS", subjects=["test.adapters.tick"]))
        psub = await js.subscribe("test.adapters.tick", ordered_consumer=True, idle_heartbeat=2.0)
        jsi = psub._sub._jsi
        assert jsi is not None
        task = jsi._hbtask  # what heartbeat_check_died reads
        assert isinstance(task, asyncio.Task) and not task.done()
        assert heartbeat_check_died(psub) is False
        await psub.unsubscribe()
        await asyncio.wait([task], timeout=5)  # unsubscribing cancels it
        assert heartbeat_check_died(psub) is True
    finally:
        await js.delete_stream("TEST_ADAPTERS")
        await nc.close()


def test_the_anthropic_names_busagents_uses_are_public() -> None:
    # AsyncAPIResponse is re-exported explicitly (``import X as X``) though not listed in __all__
    for name in ("AsyncCallNext", "APIRequest", "AsyncAPIResponse", "APIConnectionError", "APIStatusError"):
        assert hasattr(anthropic, name), f"anthropic {anthropic.__version__} no longer exports {name}"
    assert "middleware" in inspect.signature(anthropic.AsyncAnthropic).parameters


def _private_uses(path: Path, names: set[str] | None = None) -> list[str]:
    """Imports of private nats-py or anthropic names, and (with ``names``) accesses to those attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("nats", "anthropic"):
            parts = node.module.split(".") + [alias.name for alias in node.names]
            if any(p.startswith("_") for p in parts):
                found.append(f"{path.name}:{node.lineno} from {node.module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and names is not None
            and node.attr in names
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and names is not None
            and node.args[1].value in names
        ):
            found.append(f"{path.name}:{node.lineno} getattr(..., {node.args[1].value!r})")
    return found


def test_no_module_but_the_adapter_uses_a_private_name_of_nats_py_or_anthropic() -> None:
    adapter = PACKAGE / "_natspy.py"
    tree = ast.parse(adapter.read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    names = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    names += [  # getattr(x, "_name", default)
        a.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "getattr"
        for a in n.args[1:2]
        if isinstance(a, ast.Constant) and isinstance(a.value, str)
    ]
    private = {name for name in names if name.startswith("_") and not name.startswith("__") and name not in own}
    assert {"_pending_queue", "_pending_size", "_jsi", "_hbtask", "_send_command"} <= private
    offenders = [use for path in PACKAGE.rglob("*.py") if path != adapter for use in _private_uses(path, private)]
    assert offenders == []
