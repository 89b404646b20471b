"""Dead letters: hostile messages always leave one that fits the server's limits; reading and replay.

Each hostile message goes to a running agent (core, and durable), the dead letter is read back
from the ``BUSAGENTS_DLQ`` stream, and the agent still handles a valid message afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest

from busagents import Agent, Bus, Context, Durability, PermanentError, command, event, on
from busagents.dlq import (
    DLQ_DROPPED,
    DLQ_STREAM,
    DeadLetter,
    ReplayError,
    dead_letter_subject,
    ensure_dlq_stream,
    get_dead_letter,
    replay_dead_letter,
    stored_headers,
)
from busagents.envelope import MSG_ID
from busagents.server import NatsServer
from busagents.testing import run_agents

from .fault_ledger import Credit, spawn_ledger


@event("test.deadletter.order", key="order_id")
class DlOrder(msgspec.Struct):
    order_id: str
    quantity: int


@event("test.deadletter.accepted", key="order_id")
class DlAccepted(msgspec.Struct):
    order_id: str


class Shop(Agent):
    """A core agent."""

    name = "dl-shop"
    produces = (DlAccepted,)

    def __init__(self) -> None:
        self.broken = False
        self.handled: list[str] = []

    @on(DlOrder)
    async def take(self, order: DlOrder, ctx: Context) -> DlAccepted:
        if self.broken:
            raise RuntimeError(f"backend down for {order.order_id}")
        self.handled.append(str(ctx.message_id))
        return DlAccepted(order_id=order.order_id)


@command("test.deadletter.task", key="task_id", durable=Durability(ack_wait=2.0, max_deliver=2, backoff=(0.01,)))
class DlTask(msgspec.Struct):
    task_id: str
    fail: bool = False  # the handler fails, transiently, every time
    pad: str = ""


@event("test.deadletter.done", key="task_id")
class DlDone(msgspec.Struct):
    task_id: str


class Doer(Agent):
    """A durable agent."""

    name = "dl-doer"
    produces = (DlDone,)

    def __init__(self) -> None:
        self.broken = False
        self.handled: list[str] = []

    @on(DlTask)
    async def do(self, task: DlTask, ctx: Context) -> DlDone:
        if task.fail:
            raise ConnectionError(f"flaky backend for {task.task_id}")
        if self.broken:
            raise PermanentError(f"backend down for {task.task_id}")
        self.handled.append(str(ctx.message_id))
        return DlDone(task_id=task.task_id)


class StoredDeadLetters:
    """The dead letters of one agent as the DLQ stream stores them, read back with :func:`get_dead_letter`."""

    def __init__(self, bus: Bus, agent: str) -> None:
        self.bus = bus
        self.agent = agent

    async def __aenter__(self) -> StoredDeadLetters:
        await ensure_dlq_stream(self.bus.js)
        self.sub = await self.bus.js.subscribe(dead_letter_subject(self.agent), ordered_consumer=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def next(self, timeout: float = 10.0) -> DeadLetter:
        stored = await self.sub.next_msg(timeout=timeout)
        return await get_dead_letter(self.bus, stored.metadata.sequence.stream)


async def shop_serves(bus: Bus, order_id: str) -> None:
    async with bus.expect(DlAccepted, where=lambda a: a.order_id == order_id):
        await bus.publish(DlOrder(order_id=order_id, quantity=1))


async def doer_serves(bus: Bus, task_id: str) -> None:
    async with bus.expect(DlDone, where=lambda d: d.task_id == task_id, timeout=10):
        await bus.publish(DlTask(task_id=task_id))


def header_block_size(headers: dict[str, str]) -> int:
    return len(b"NATS/1.0\r\n\r\n") + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def assert_fits(letter: DeadLetter, max_payload: int) -> None:
    block = header_block_size(letter.headers)
    assert block <= 32 * 1024, f"a {block}-byte header block: JetStream takes 64 KiB at most"
    assert block + len(letter.data) <= max_payload


async def raw_publish(url: str, subject: str, header_block: bytes, body: bytes) -> None:
    """HPUB written by hand, for headers nats-py refuses to send; returns once the server took it."""
    where = urlsplit(url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"headers":true,"verbose":false,"pedantic":false}\r\n')
        size = len(header_block) + len(body)
        writer.write(
            b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (subject.encode(), len(header_block), size, header_block, body)
        )
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


@dataclass(frozen=True)
class Target:
    agent: type[Shop] | type[Doer]
    subject: str
    serves: Callable[[Bus, str], Awaitable[None]]


TARGETS = {
    "core": Target(Shop, "test.deadletter.order.o1", shop_serves),
    "durable": Target(Doer, "test.deadletter.task.t1", doer_serves),
}
UNDECODABLE = b"{not json"
ARABIC_ONE = "\u0661"  # a digit, not ASCII


# Hostile messages


@pytest.mark.parametrize("kind", ["core", "durable"])
@pytest.mark.parametrize(
    ("case", "dropped"),
    [
        ("header_name_not_a_token", "Foo(bar) (not a token)"),
        ("non_ascii_header_value", "X-Note (not printable ASCII)"),
        ("64_kb_header_block", "X-Big (over the 16 KiB kept)"),
        ("jetstream_headers", "Nats-Expected-Stream (reserved)"),
    ],
)
async def test_an_undecodable_message_with_hostile_headers_leaves_a_dead_letter_that_fits(
    bus: Bus, nats_server: NatsServer, kind: str, case: str, dropped: str
) -> None:
    target = TARGETS[kind]
    msg_id = f"hostile-{case}"
    async with run_agents(bus, target.agent()), StoredDeadLetters(bus, target.agent.name) as letters:
        if case == "header_name_not_a_token":  # nats-py refuses to send it
            block = f"NATS/1.0\r\nFoo(bar): 1\r\nX-Kept: yes\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
            await raw_publish(nats_server.url, target.subject, block, UNDECODABLE)
        else:
            hostile = {
                "non_ascii_header_value": {"X-Note": ARABIC_ONE},
                "64_kb_header_block": {"X-Big": "a" * 65_300},
                # stored with the original; JetStream would refuse the dead letter that repeated it
                "jetstream_headers": {"Nats-Expected-Stream": "BA_DlTask"},
            }[case]
            headers = {**hostile, "X-Kept": "yes", MSG_ID: msg_id}
            await bus.nc.publish(target.subject, UNDECODABLE, headers=headers)
        letter = await letters.next()
        await target.serves(bus, "after")
    assert letter.stage == "decode" and "malformed JSON" in letter.reason
    assert letter.data == UNDECODABLE
    assert letter.headers["X-Kept"] == "yes"
    assert dropped in letter.headers[DLQ_DROPPED]
    assert letter.original_id == msg_id
    assert letter.headers[MSG_ID] != msg_id
    assert_fits(letter, bus.nc.max_payload)


@pytest.mark.parametrize("kind", ["core", "durable"])
async def test_an_undecodable_message_near_max_payload_leaves_a_truncated_dead_letter_that_fits(
    bus: Bus, kind: str
) -> None:
    target = TARGETS[kind]
    headers = {MSG_ID: "near-max", "X-Kept": "yes"}
    body = b"{" + b"x" * (bus.nc.max_payload - header_block_size(headers) - 100)  # fits, with dead-letter headers not
    async with run_agents(bus, target.agent()), StoredDeadLetters(bus, target.agent.name) as letters:
        await bus.nc.publish(target.subject, body, headers=headers)
        letter = await letters.next()
        await target.serves(bus, "after")
    assert letter.stage == "decode"
    assert letter.truncated == len(body)
    assert 0 < len(letter.data) < len(body) and body.startswith(letter.data)
    assert letter.headers["X-Kept"] == "yes"
    assert_fits(letter, bus.nc.max_payload)
    with pytest.raises(ReplayError, match=f"kept {len(letter.data)} of the original's {len(body)} bytes"):
        await replay_dead_letter(bus, letter)


async def test_a_message_near_max_payload_failing_every_delivery_leaves_a_max_deliveries_dead_letter_that_fits(
    bus: Bus,
) -> None:
    task = DlTask(task_id="heavy", fail=True)
    headers = {MSG_ID: "heavy"}
    task.pad = "x" * (bus.nc.max_payload - len(msgspec.json.encode(task)) - header_block_size(headers) - 100)
    async with run_agents(bus, Doer()), StoredDeadLetters(bus, "dl-doer") as letters:
        await bus.js.publish("test.deadletter.task.heavy", msgspec.json.encode(task), timeout=5, headers=headers)
        letter = await letters.next()
        await doer_serves(bus, "after")
    assert letter.stage == "max-deliveries" and letter.deliveries == 2
    assert "ConnectionError: flaky backend for heavy" in letter.reason
    assert letter.truncated is not None and letter.truncated > len(letter.data) > 0
    assert_fits(letter, bus.nc.max_payload)


async def test_a_message_near_max_payload_that_kills_its_process_is_dead_lettered_from_the_advisory(
    tmp_path: Path,
) -> None:
    with NatsServer() as server:
        bus = await Bus.connect(server.url)
        await bus.ensure_stream(Credit)
        # two replicas: one is alive to take the advisory when the other dies of the message
        env = {"BUSAGENTS_ACK_WAIT": "2", "BUSAGENTS_MAX_DELIVER": "2"}
        replicas = [spawn_ledger(server.url, str(tmp_path / "ledger.db"), replica=r, **env) for r in ("a", "b")]
        deaths = 0
        try:
            async with StoredDeadLetters(bus, "ledger") as letters:
                body = msgspec.json.encode({"account": "acct-crash", "n": 1, "crash": True, "pad": ""})
                body = body[:-2] + b"x" * (bus.nc.max_payload - len(body) - 100) + b'"}'
                await bus.js.publish("faults.credit.acct-crash", body, timeout=5)
                arrived = asyncio.ensure_future(letters.next(timeout=60))
                while not arrived.done():  # a supervisor: restart a replica the message killed
                    exits = {asyncio.ensure_future(asyncio.to_thread(p.wait)): p for p in replicas}
                    done, _ = await asyncio.wait([arrived, *exits], return_when=asyncio.FIRST_COMPLETED)
                    for waited, replica in exits.items():
                        if waited in done:
                            deaths += 1
                            replicas[replicas.index(replica)] = spawn_ledger(
                                server.url, str(tmp_path / "ledger.db"), replica=f"r{deaths}", **env
                            )
                letter = arrived.result()
        finally:
            for replica in replicas:
                replica.terminate()
            for replica in replicas:
                await asyncio.to_thread(replica.wait, 10)
            await bus.close()
    assert letter.stage == "max-deliveries" and letter.deliveries == 2
    assert "never settled" in letter.reason
    assert letter.headers[MSG_ID].startswith("dlq.ledger.BA_Credit.")
    assert letter.truncated == len(body)
    assert body.startswith(letter.data)
    assert_fits(letter, bus.nc.max_payload)
    assert deaths >= 2  # each of the 2 deliveries killed its process (CI once counted a third exit, cause unknown)


async def test_an_advisory_naming_another_stream_dead_letters_nothing_from_it(bus: Bus) -> None:
    async with run_agents(bus, Doer()), StoredDeadLetters(bus, "dl-doer") as letters:
        await bus.js.add_stream(name="DL_SECRET", subjects=["test.deadletter.secret"])
        secret = await bus.js.publish("test.deadletter.secret", b"not for the DLQ", timeout=5)
        task = await bus.js.publish("test.deadletter.task.t1", b'{"task_id": "t1"}', timeout=5)
        # anyone may publish on the advisory subject; the agent's advisories are handled in order
        subject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.BA_DlTask.dl-doer"
        for stream, seq in (("DL_SECRET", secret.seq), ("BA_DlTask", task.seq)):
            await bus.nc.publish(subject, json.dumps({"stream": stream, "stream_seq": seq, "deliveries": 2}).encode())
        letter = await letters.next()
    assert letter.data == b'{"task_id": "t1"}'  # the first dead letter is the one about the agent's stream
    assert letter.headers[MSG_ID] == f"dlq.dl-doer.BA_DlTask.{task.seq}"


async def test_two_bad_messages_with_one_message_id_leave_two_dead_letters(bus: Bus) -> None:
    async with run_agents(bus, Shop()), StoredDeadLetters(bus, "dl-shop") as letters:
        for body in (b"{first", b"{second"):
            await bus.nc.publish("test.deadletter.order.o1", body, headers={MSG_ID: "chosen-by-the-sender"})
        first, second = await letters.next(), await letters.next()
    assert (first.data, second.data) == (b"{first", b"{second")
    assert first.original_id == second.original_id == "chosen-by-the-sender"
    assert len({first.headers[MSG_ID], second.headers[MSG_ID], "chosen-by-the-sender"}) == 3


async def test_a_durable_dead_letter_has_the_same_id_on_every_redelivery(bus: Bus) -> None:
    doer = Doer()
    doer.broken = True
    async with run_agents(bus, doer), StoredDeadLetters(bus, "dl-doer") as letters:
        ack = await bus.js.publish("test.deadletter.task.t1", b'{"task_id": "t1"}', timeout=5)
        letter = await letters.next()
    assert letter.headers[MSG_ID] == f"dlq.dl-doer.BA_DlTask.{ack.seq}"


# Reading


async def test_header_values_nats_py_reads_as_email_headers_come_back_as_text(bus: Bus) -> None:
    await ensure_dlq_stream(bus.js)
    ack = await bus.js.publish("busagents.dlq.dl-shop", b"{}", timeout=5, headers={"Ba-Version": ARABIC_ONE, "X": "a"})
    raw = await bus.js.get_msg(DLQ_STREAM, seq=ack.seq)
    # nats-py's get_msg gives an email.header.Header for a non-ASCII value
    assert raw.headers is not None and type(raw.headers["Ba-Version"]) is not str
    assert stored_headers(raw) == {"Ba-Version": ARABIC_ONE, "X": "a"}  # from the raw header block
    raw.hdrs = None
    assert stored_headers(raw) == {"Ba-Version": ARABIC_ONE, "X": "a"}  # from nats-py's parse


def busagents_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUSAGENTS_NATS_URL": ""}
    return subprocess.run(
        [sys.executable, "-m", "busagents", *args],
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        env=env,
    )


async def test_dlq_list_show_and_replay_a_dead_letter_with_a_non_ascii_header(
    bus: Bus, nats_server: NatsServer
) -> None:
    shop = Shop()
    url = nats_server.url
    async with run_agents(bus, shop), StoredDeadLetters(bus, "dl-shop") as letters:
        headers = {"Ba-Contract": "DlOrder", "Ba-Version": ARABIC_ONE, MSG_ID: "v-1"}
        await bus.nc.publish("test.deadletter.order.o9", b'{"order_id": "o9", "quantity": 1}', headers=headers)
        letter = await letters.next()
        assert letter.stage == "version"
        assert letter.reason == f"version {ARABIC_ONE} of DlOrder is not accepted here: accepted 1"
        listed = await asyncio.to_thread(busagents_cli, "dlq", "list", "--nats", url)
        assert listed.returncode == 0, listed.stderr
        assert f"{letter.seq}" in listed.stdout and "dl-shop" in listed.stdout
        assert f"version {ARABIC_ONE} of DlOrder" in listed.stdout
        shown = await asyncio.to_thread(busagents_cli, "dlq", "show", str(letter.seq), "--nats", url)
        assert shown.returncode == 0, shown.stderr
        assert f"Ba-Dlq-Reason: version {ARABIC_ONE} of DlOrder is not accepted here: accepted 1" in shown.stdout
        assert "Ba-Version (not printable ASCII)" in shown.stdout
        async with bus.expect(DlAccepted, where=lambda a: a.order_id == "o9"):  # the replay, handled
            replayed = await asyncio.to_thread(busagents_cli, "dlq", "replay", str(letter.seq), "--nats", url)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed #{letter.seq} on test.deadletter.order.o9 as " in replayed.stdout
    assert "delivered on core NATS" in replayed.stdout
    assert len(shop.handled) == 1 and shop.handled[0].startswith("v-1")  # the replay, seen with the original id


# Replay


async def test_replaying_a_core_dead_letter_twice_delivers_it_twice_on_core_nats(bus: Bus) -> None:
    shop = Shop()
    shop.broken = True
    async with run_agents(bus, shop), StoredDeadLetters(bus, "dl-shop") as letters:
        original = await bus.publish(DlOrder(order_id="o1", quantity=1))
        letter = await letters.next()
        shop.broken = False
        async with bus.expect(DlAccepted, where=lambda a: a.order_id == "o1", count=2):
            first = await replay_dead_letter(bus, letter)
            second = await replay_dead_letter(bus, letter)
    assert letter.reason == "RuntimeError: backend down for o1"
    assert first.stream is second.stream is None  # core NATS: not stored anywhere
    assert first.msg_id != second.msg_id
    assert len(shop.handled) == 2 and shop.handled[0] == shop.handled[1]  # both seen with the original id
    assert shop.handled[0].startswith(original.id)


async def test_replaying_a_durable_dead_letter_twice_stores_it_twice_and_delete_drops_it_after(bus: Bus) -> None:
    doer = Doer()
    doer.broken = True
    async with run_agents(bus, doer), StoredDeadLetters(bus, "dl-doer") as letters:
        original = await bus.publish(DlTask(task_id="t1"))
        letter = await letters.next()
        doer.broken = False
        async with bus.expect(DlDone, where=lambda d: d.task_id == "t1", count=2, timeout=10):
            first = await replay_dead_letter(bus, letter)
            second = await replay_dead_letter(bus, letter, delete=True)
        remaining = await bus.js.stream_info(DLQ_STREAM)
    assert letter.stage == "handler" and letter.reason == "PermanentError: backend down for t1"
    assert first.stream == second.stream == "BA_DlTask"
    assert first.seq is not None and second.seq is not None and second.seq > first.seq
    assert first.msg_id != second.msg_id
    assert len(doer.handled) == 2 and doer.handled[0] == doer.handled[1]  # both seen with the original id
    assert doer.handled[0].startswith(original.id)
    assert remaining.state.messages == 0  # deleted once the second replay was stored


async def test_a_core_replay_no_one_receives_fails_and_keeps_the_dead_letter(bus: Bus) -> None:
    shop = Shop()
    shop.broken = True
    async with StoredDeadLetters(bus, "dl-shop") as letters:
        async with run_agents(bus, shop):
            await bus.publish(DlOrder(order_id="o1", quantity=1))
            letter = await letters.next()
        with pytest.raises(ReplayError, match=r"no one subscribes to test\.deadletter\.order\.o1"):
            await replay_dead_letter(bus, letter, delete=True)
    kept = await get_dead_letter(bus, letter.seq)
    assert kept.data == letter.data
