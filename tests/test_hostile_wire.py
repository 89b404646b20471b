"""Hostile input on the wire never stalls an agent: its connection stays up and it keeps serving.

Three kinds of trouble, each against a running agent on its own connection:

- bytes nats-py could not read (a header block or subject it choked on) ended its read loop,
  and the agent stayed connected but deaf until stale detection, minutes later (so did the
  PONG of a flush given up on);
- outputs over a server limit (a long key in the subject, headers + payload over
  ``max_payload``, a huge id copied from the input) made the server close the connection,
  for good: nats-py does not reconnect after ``-ERR``;
- a connection lost: said once when it goes and once when it is back; when it is closed for
  good, ``busagents run`` exits instead of running on deaf.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from nats.aio.msg import Msg

from busagents import Agent, Bus, Context, Durability, command, event, on
from busagents.server import NatsServer
from busagents.testing import run_agents

ROOT = Path(__file__).parent.parent
QUICK = 5.0  # seconds: "within a few seconds", where a deaf connection took minutes


@command("test.hostile.work", key="key")
class Work(msgspec.Struct):
    key: str
    n: int
    out: str = "ok"  # the output's key, so the end of its subject
    pad: int = 0  # characters of padding in the output


STORED = Durability(stream="TEST_HOSTILE_STORED", max_deliver=3, backoff=(0.1,))


@command("test.hostile.stored", key="key", durable=STORED)
class StoredWork(msgspec.Struct):
    key: str
    n: int
    out: str = "ok"
    pad: int = 0


@event("test.hostile.done", key="out")
class Done(msgspec.Struct):
    key: str
    n: int
    out: str
    pad: str = ""


class Hostile(Agent):
    """Answers each Work with a Done as large and with the key the Work asks for."""

    name = "hostile"
    produces = (Done,)

    @on(Work)
    async def work(self, msg: Work, ctx: Context) -> Done:
        return Done(key=msg.key, n=msg.n, out=msg.out, pad="x" * msg.pad)


class HostileStored(Agent):
    """The same on a durable contract, counting its calls."""

    name = "hostile-stored"
    produces = (Done,)

    def __init__(self) -> None:
        self.calls: list[int] = []

    @on(StoredWork)
    async def work(self, msg: StoredWork, ctx: Context) -> Done:
        self.calls.append(msg.n)
        return Done(key=msg.key, n=msg.n, out=msg.out, pad="x" * msg.pad)


@pytest_asyncio.fixture
async def agent_bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """The agent's own connection: what the hostile bytes and outputs could break."""
    connected = await Bus.connect(nats_server.url, name="hostile-agent")
    try:
        yield connected
    finally:
        await connected.close()


def assert_unharmed(agent_bus: Bus) -> None:
    nc = agent_bus.nc
    assert nc.is_connected, "the agent's connection is gone"
    assert nc.stats["reconnects"] == 0, "the agent's connection was replaced"
    assert agent_bus.lost is None


# Raw protocol, written by hand: what a hostile client can send.


async def send_raw(url: str, *commands: bytes) -> None:
    """Send ``commands`` from a plain TCP connection; returns once the server has processed them."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        await asyncio.wait_for(reader.readline(), QUICK)  # INFO
        connect = b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
        writer.write(connect + b"".join(commands) + b"PING\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), QUICK)
        assert answer == b"PONG\r\n", f"the server refused the commands: {answer!r}"
    finally:
        writer.close()
        await writer.wait_closed()


def pub(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    return b"PUB %s %s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)


def hpub(subject: bytes, block: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(block), len(block) + len(payload), block, payload)


def work(n: int) -> bytes:
    return msgspec.json.encode(Work(key="k", n=n))


def number(n: int) -> Callable[[Done], bool]:
    return lambda done: done.n == n


HOSTILE_BYTES = {
    "a header status line that is not UTF-8": hpub(b"test.hostile.work.k", b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", work(1)),
    "a header block with no line end": hpub(b"test.hostile.work.k", b"NATS/1.0", work(1)),
    "a header block that is not one": hpub(b"test.hostile.work.k", b"XXXX", work(1)),
    "a subject that is not UTF-8": pub(b"test.hostile.work.\xff\xfe", work(1)),
    "a reply subject that is not UTF-8": pub(b"test.hostile.work.k", work(1), reply=b"reply.\xff\xfe"),
    "a subject with a form feed": pub(b"test.hostile.work.k\x0cx", work(1)),
}


@pytest.mark.parametrize("case", list(HOSTILE_BYTES))
async def test_bytes_nats_py_choked_on_reach_the_agent_and_it_keeps_serving(
    bus: Bus, agent_bus: Bus, nats_server: NatsServer, case: str
) -> None:
    async with run_agents(agent_bus, Hostile()):
        async with bus.expect(Done, where=number(1), timeout=QUICK):  # the hostile message itself is handled
            await send_raw(nats_server.url, HOSTILE_BYTES[case])
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert_unharmed(agent_bus)


async def test_a_stored_message_with_a_subject_that_is_not_utf8_is_handled_once_not_poison(
    bus: Bus, agent_bus: Bus, nats_server: NatsServer
) -> None:
    agent = HostileStored()
    async with run_agents(agent_bus, agent):
        async with bus.expect(Done, where=number(1), timeout=QUICK):
            await send_raw(nats_server.url, pub(b"test.hostile.stored.\xff\xfe", msgspec.json.encode(Work("k", 1))))
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(StoredWork(key="k", n=2))
        await settled(bus, agent.name)
    assert agent.calls == [1, 2]
    assert_unharmed(agent_bus)


async def settled(bus: Bus, consumer: str) -> None:
    """Wait until the consumer has nothing pending nor unacknowledged."""
    async with asyncio.timeout(QUICK):
        while True:
            info = await bus.js.consumer_info(STORED.stream or "", consumer)
            if not info.num_pending and not info.num_ack_pending:
                return
            await asyncio.sleep(0.05)  # polling the server's own account of the consumer


async def test_the_pong_of_a_flush_given_up_on_leaves_the_connection_reading(bus: Bus, agent_bus: Bus) -> None:
    # A flush that times out or is cancelled (a drain with a deadline) cancels its PONG's future;
    # nats-py then failed to set its result when the PONG came and its read loop ended.
    async with run_agents(agent_bus, Hostile()):
        flushing = asyncio.create_task(agent_bus.nc.flush())
        await asyncio.sleep(0)  # one step of the task: its PING goes out
        assert agent_bus.nc._pongs, "the flush did not send its PING yet"
        flushing.cancel()
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert flushing.cancelled()
    assert_unharmed(agent_bus)


# Outputs over a server limit


class DeadLetters:
    """The dead letters of one agent, as they are published."""

    def __init__(self, bus: Bus, agent: str) -> None:
        self.bus = bus
        self.subject = f"busagents.dlq.{agent}"
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def __aenter__(self) -> DeadLetters:
        self.sub = await self.bus.nc.subscribe(self.subject, cb=self.queue.put)
        await self.bus.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def reason(self) -> str:
        msg = await asyncio.wait_for(self.queue.get(), QUICK)
        return (msg.headers or {}).get("Ba-Dlq-Reason", "")


async def test_an_output_whose_subject_is_too_long_is_refused_and_its_input_dead_lettered(
    bus: Bus, agent_bus: Bus
) -> None:
    async with run_agents(agent_bus, Hostile()), DeadLetters(bus, "hostile") as letters:
        await bus.publish(Work(key="k", n=1, out="o" * 5000))
        reason = await letters.reason()
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert reason.startswith("MessageTooLargeError")
    assert "control line" in reason and "4096" in reason
    assert_unharmed(agent_bus)


async def test_an_output_over_max_payload_with_its_headers_is_refused_and_its_input_dead_lettered(
    bus: Bus, agent_bus: Bus
) -> None:
    # The payload alone fits, so nats-py let it through; the server counts the headers too.
    pad = agent_bus.nc.max_payload - 100
    async with run_agents(agent_bus, Hostile()), DeadLetters(bus, "hostile") as letters:
        await bus.publish(Work(key="k", n=1, pad=pad))
        reason = await letters.reason()
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    assert reason.startswith("MessageTooLargeError")
    assert f"max_payload of {agent_bus.nc.max_payload} bytes" in reason
    assert_unharmed(agent_bus)


@pytest.mark.parametrize("too_large", ["subject", "payload"])
async def test_a_durable_input_whose_output_is_too_large_is_dead_lettered_at_once_not_retried(
    bus: Bus, agent_bus: Bus, too_large: str
) -> None:
    # MaxPayloadError was transient: the input (its effects applied again each time) was retried.
    agent = HostileStored()
    big = StoredWork(key="k", n=1, out="o" * 5000) if too_large == "subject" else StoredWork(key="k", n=1, pad=2**21)
    async with run_agents(agent_bus, agent), DeadLetters(bus, agent.name) as letters:
        await bus.publish(big)
        reason = await letters.reason()
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(StoredWork(key="k", n=2))
        await settled(bus, agent.name)
    assert reason.startswith("MessageTooLargeError")
    assert agent.calls == [1, 2]
    assert_unharmed(agent_bus)


async def test_a_huge_conversation_id_is_not_copied_into_outputs(bus: Bus, agent_bus: Bus) -> None:
    # The input fits in max_payload; its ids copied into an output with a larger payload did not.
    huge = "c" * (agent_bus.nc.max_payload - 5000)
    payload = msgspec.json.encode(Work(key="k", n=1, pad=5000))
    async with run_agents(agent_bus, Hostile()):
        async with bus.expect(Done, where=number(1), timeout=QUICK) as got:
            await bus.nc.publish(
                "test.hostile.work.k", payload, headers={"Ba-Conversation-Id": huge, "Nats-Msg-Id": "m" * 1000}
            )
        async with bus.expect(Done, where=number(2), timeout=QUICK):
            await bus.publish(Work(key="k", n=2))
    envelope = got.message.envelope
    assert envelope.conversation_id.startswith("~") and len(envelope.conversation_id) == 23
    assert envelope.causation_id is not None and len(envelope.causation_id) == 23
    assert_unharmed(agent_bus)


def test_ids_from_the_wire_are_bounded_and_the_same_id_is_replaced_the_same_way() -> None:
    from busagents.envelope import Envelope, bounded_id

    assert bounded_id("plain-id_0.1:x") == "plain-id_0.1:x"
    assert bounded_id("a" * 256) == "a" * 256
    for hostile in ("a" * 257, "with space", "tab\there", "z\u00fcrich", "bell\x07"):
        replaced = bounded_id(hostile)
        assert replaced != hostile and len(replaced) == 23 and replaced == bounded_id(hostile)
    assert bounded_id("a" * 300) != bounded_id("b" * 300)
    envelope = Envelope.from_headers({"Nats-Msg-Id": "i" * 10_000, "Ba-Conversation-Id": "c\r\nX: y"})
    assert len(envelope.id) == 23 and len(envelope.conversation_id) == 23


# A lost connection


class LogWatch(logging.Handler):
    """Records of one logger, with a way to await one that matches."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    async def until(self, predicate: Callable[[list[logging.LogRecord]], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.records):
                self.changed.clear()
                await self.changed.wait()

    def __enter__(self) -> LogWatch:
        self.previous = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.previous)


def saying(text: str, count: int = 1) -> Callable[[list[logging.LogRecord]], bool]:
    return lambda records: sum(text in r.getMessage() for r in records) >= count


async def test_an_outage_is_said_once_when_it_starts_and_once_when_it_ends() -> None:
    server = NatsServer(jetstream=False).start()
    try:
        bus = await Bus.connect(server.url)
        try:
            with LogWatch("busagents.bus") as logs:
                server.stop()
                await logs.until(saying("lost the connection"))
                await logs.until(saying("reconnect attempt", 4))  # nats-py tries every 0.5 s meanwhile
                server.start()
                await logs.until(saying("connection back after"))
            await bus.flush()
        finally:
            await bus.close()
    finally:
        server.stop()
    warnings = logs.messages()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"nats: lost the connection to {server.url}")
    assert warnings[1].startswith("nats: connection back after ")


async def test_a_long_outage_is_recalled_at_most_every_reminder_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("busagents.bus.OUTAGE_REMINDER", 1.0)
    server = NatsServer(jetstream=False).start()
    try:
        bus = await Bus.connect(server.url)
        try:
            with LogWatch("busagents.bus") as logs:
                server.stop()
                await logs.until(saying("still no connection", 2))
                attempts = sum("reconnect attempt" in m for m in logs.messages(logging.DEBUG))
                reminders = [r for r in logs.records if "still no connection" in r.getMessage()]
        finally:
            await bus.close()
    finally:
        server.stop()
    assert attempts > len(reminders)  # not one per attempt
    assert reminders[1].created - reminders[0].created >= 1.0


async def test_busagents_run_exits_when_the_server_closes_its_connection_for_good(tmp_path: Path) -> None:
    # A server with a short control line: the agent's output subject passes busagents' own
    # check (4096 bytes) but not this server's, which answers -ERR and closes the connection.
    config = tmp_path / "nats.conf"
    config.write_text("max_control_line: 512\n")
    with NatsServer(jetstream=False, config_file=config) as server:
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "busagents",
            "run",
            f"{__name__}:Hostile",
            "--nats",
            server.url,
            cwd=ROOT,
            env={**os.environ, "BUSAGENTS_HEARTBEAT_INTERVAL": "1"},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            bus = await Bus.connect(server.url)
            try:
                await bus.wait_for_agents(["hostile"], timeout=30)
                await bus.publish(Work(key="k", n=1, out="o" * 1000))
            finally:
                await bus.close()
            code = await asyncio.wait_for(agent.wait(), 30)
            assert agent.stderr is not None
            stderr = (await agent.stderr.read()).decode()
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
    assert code == 1, stderr
    assert "maximum control line exceeded" in stderr
    assert "error: agent hostile stops: the connection to" in stderr
