"""Hostile input at volume: every kind of bad bytes of issue 14, mixed with valid messages, on the raw wire.

``python -m benchmarks.hostile`` starts a nats-server and the two agents of
``tests/fuzz_agents.py`` as ``busagents run`` processes, sends each 10,000 messages drawn by
:class:`Traffic` (half valid, half hostile, every kind) over plain TCP connections speaking
the NATS protocol by hand, and prints, per kind: what was sent, what had its effect (exactly
once?), what was dead-lettered, what the server or JetStream refused; then the longest time a
probe waited for an answer and the agents' RSS before and after. ``tests/test_fuzz.py`` runs
the same generator under hypothesis, a few dozen messages per example.

What counts, for each message (:func:`verify`):

- a valid one has its effect exactly once (one ledger row) and its output exactly once;
- a hostile one is dead-lettered (one dead letter in ``BUSAGENTS_DLQ`` with a
  ``Ba-Dlq-Reason``), or handled when busagents reads it as valid (headers it cannot parse
  are dropped), as :class:`Kind` says; or refused at the edge (the server closed the raw
  connection, JetStream did not store it), and then it left no trace at all;
- nothing the agent sends lands on the reply subject of an event;
- the agent answers a valid message at the end, and its process still runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import psutil
from nats.aio.msg import Msg

from busagents import Bus, contract_info
from busagents.dlq import (
    DLQ_DROPPED,
    DLQ_MSG_ID,
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_STREAM,
    DLQ_SUBJECT,
    dead_letter_subject,
    stored_headers,
)
from busagents.server import NatsServer
from tests.fuzz_agents import ORDERS, SHIPPED, Done, Order, Shipped, Work, effect_counts

__all__ = [
    "CORE",
    "DURABLE",
    "KINDS",
    "Draw",
    "Expect",
    "Kind",
    "RandomDraw",
    "Run",
    "Sent",
    "Target",
    "Traffic",
    "Wire",
    "run_traffic",
    "spawn_agent",
    "verify",
]

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

#: Seconds within which the agent must answer a valid message ("nothing hangs").
QUICK = 5.0
#: Every marker: the business id of a valid message, the key token of every message's subject.
_MARKER = re.compile(r"fz[0-9a-f]{6}n[0-9]+q")


# Who is fuzzed


@dataclass(frozen=True)
class Target:
    """One agent under fuzz: how to run it, what it takes and what it answers with."""

    name: str
    spec: str  # for ``busagents run``
    contract: type[Any]
    output: type[Any]

    @property
    def subject(self) -> str:
        return contract_info(self.contract).subject

    @property
    def output_subject(self) -> str:
        return contract_info(self.output).subject

    @property
    def durable(self) -> bool:
        return contract_info(self.contract).durable


CORE = Target("fuzz-core", "tests.fuzz_agents:CoreLedger", Work, Done)
DURABLE = Target("fuzz-durable", "tests.fuzz_agents:DurableLedger", Order, Shipped)


def spawn_agent(
    target: Target, url: str, db: Path, log: Path, *, log_level: str = "WARNING"
) -> subprocess.Popen[bytes]:
    """``busagents run <target>`` as its own process, its ledger in ``db``, its output in ``log``."""
    env = {**os.environ, "FUZZ_DB": str(db), "BUSAGENTS_HEARTBEAT_INTERVAL": "1"}
    argv = [sys.executable, "-m", "busagents", "--log-level", log_level, "run", target.spec, "--nats", url]
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


# What is sent


class Expect(enum.Enum):
    """What the agent must make of a message the edge let through."""

    HANDLED = "effect and output"
    DEAD = "dead letter"
    HANDLED_DEAD = "effect, then a dead letter (its output too large to send)"


@dataclass(slots=True)
class Sent:
    """One message on the wire, and what became of it at the edge."""

    marker: str
    kind: str
    frame: bytes  # the protocol bytes: PUB or HPUB, payload, CRLF
    expect: Expect
    stage: str | None  # the dead letter's Ba-Dlq-Stage
    valid: bool  # a valid message: the edge must take it
    reply: str  # as a subscriber sees it (U+FFFD for bytes that are not UTF-8)
    letter: dict[str, str] = field(default_factory=dict)  # text each of its dead letter's headers must contain
    refused: str | None = None  # why the server or JetStream did not take it


class Draw(Protocol):
    """The choices a generator makes: hypothesis's (``tests/test_fuzz.py``) or a seeded Random's."""

    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: Sequence[T]) -> T: ...


class RandomDraw:
    """Choices from a seeded :class:`random.Random`."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]


Headers = list[tuple[bytes, bytes]]


class Traffic:
    """The messages for one agent, built kind by kind (:data:`KINDS`) with the choices of a :class:`Draw`."""

    def __init__(self, target: Target, run: str, max_payload: int) -> None:
        self.target = target
        self.run = run  # 6 hex digits, one per Traffic: markers of separate ones never meet
        self.max_payload = max_payload
        self.messages: list[Sent] = []
        self._n = 0

    def add(self, kind: str, draw: Draw) -> None:
        KINDS[kind].build(self, draw)

    def add_mixed(self, draw: Draw) -> None:
        """A valid message half the time, else one of any other kind."""
        self.add("valid" if draw.integer(0, 1) else draw.choice(OTHERS), draw)

    def marker(self) -> str:
        self._n += 1
        return f"fz{self.run}n{self._n}q"

    def send(
        self,
        marker: str,
        kind: str,
        expect: Expect,
        stage: str | None,
        payload: bytes,
        *,
        headers: Headers | None = None,
        block: bytes | None = None,
        subject: bytes | None = None,
        reply: bytes | None = None,
        letter: dict[str, str] | None = None,
    ) -> None:
        if block is None and headers:
            block = header_block(headers)
        if subject is None:
            subject = f"{self.target.subject}.{marker}".encode()
        if reply is None:  # JetStream answers a publish on its reply subject: stored, duplicate or refused
            reply = f"fuzz.ack.{marker}".encode() if self.target.durable else b""
        route = b"%s %s" % (subject, reply) if reply else subject
        if block is None:
            frame = b"PUB %s %d\r\n%s\r\n" % (route, len(payload), payload)
        else:
            size = len(block) + len(payload)
            frame = b"HPUB %s %d %d\r\n%s%s\r\n" % (route, len(block), size, block, payload)
        shown = reply.decode("utf-8", "replace")
        self.messages.append(Sent(marker, kind, frame, expect, stage, kind in VALID, shown, letter or {}))

    # Parts of messages

    def body(self, marker: str, draw: Draw, *, key: str | None = None, text: str | None = None) -> bytes:
        if text is None:
            text = "".join(draw.choice(_TEXT) for _ in range(draw.integer(0, 8)))
        return msgspec.json.encode(self.target.contract(id=marker, key=key or marker, text=text))

    def envelope(self, marker: str, draw: Draw) -> Headers:
        """Headers as busagents sends them, some of them, or none (a plain NATS client)."""
        which = draw.choice(("full", "id", "none"))
        if which == "none":
            return []
        headers = [(b"Nats-Msg-Id", f"{marker}-id".encode())]
        if which == "full":
            name = contract_info(self.target.contract).name.encode()
            headers += [
                (b"Ba-Contract", name),
                (b"Ba-Version", b"1"),
                (b"Ba-Conversation-Id", f"{marker}-c".encode()),
                (b"Ba-Sent-At", str(time.time_ns()).encode()),
            ]
        return headers

    def body_or_bad(self, marker: str, draw: Draw) -> tuple[bytes, Expect, str | None]:
        """A valid body or a bad one, with what the agent must make of it."""
        if draw.integer(0, 1):
            return self.body(marker, draw), Expect.HANDLED, None
        return bad_body(marker, draw), Expect.DEAD, "decode"


def header_block(headers: Headers, status: bytes = b"NATS/1.0") -> bytes:
    return status + b"\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n"


def bad_body(marker: str, draw: Draw) -> bytes:
    """A body that does not decode to the contract (the marker in it, for a reader)."""
    m = marker.encode()
    return draw.choice(
        (
            b"not json " + m + b" \xff\xfe",
            b'{"id": 5, "key": "' + m + b'"}',
            b'{"id": "' + m + b'"}',
            b"",
            b'{"id": "' + m + b'", "key": "' + m + b'", "text": ',
            b"[" + m + b"]",
        )
    )


_TEXT = ("a", "Z", " ", "\u00e9", "\u00fc", "\u0661", "\U0001f600", '"', "\\", "\n", "\u2028", "\x00")


# The kinds: one builder each


@dataclass(frozen=True)
class Kind:
    """A kind of message: its description and a builder that adds one or two to a :class:`Traffic`."""

    name: str
    description: str
    build: Callable[[Traffic, Draw], None]


def _valid(t: Traffic, d: Draw) -> None:
    m = t.marker()
    t.send(m, "valid", Expect.HANDLED, None, t.body(m, d), headers=t.envelope(m, d))


def _status_not_utf8(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload, expect, stage = t.body_or_bad(m, d)
    block = header_block(t.envelope(m, d), status=b"NATS/1.0 \xff\xfe\xfd")
    t.send(m, "status-not-utf8", expect, stage, payload, block=block)


def _no_line_end(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload, expect, stage = t.body_or_bad(m, d)
    t.send(m, "no-line-end", expect, stage, payload, block=b"NATS/1.0")


_NOT_UTF8 = (b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80")


def _subject_not_utf8(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload, expect, stage = t.body_or_bad(m, d)
    bad = d.choice(_NOT_UTF8)
    token = bad + m.encode() if d.integer(0, 1) else m.encode() + bad
    subject = t.target.subject.encode() + b"." + token
    t.send(m, "subject-not-utf8", expect, stage, payload, headers=t.envelope(m, d), subject=subject)


def _reply_not_utf8(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload, expect, stage = t.body_or_bad(m, d)
    reply = f"fuzz.reply.{m}.".encode() + d.choice(_NOT_UTF8)
    t.send(m, "reply-not-utf8", expect, stage, payload, headers=t.envelope(m, d), reply=reply)


def _long_key(t: Traffic, d: Draw) -> None:
    m = t.marker()
    key = m + "k" * (d.integer(4100, 8000) - len(m))  # the output's subject: over the 4,096-byte control line
    letter = {DLQ_REASON: "MessageTooLargeError"}
    t.send(
        m, "long-key", Expect.HANDLED_DEAD, "handler", t.body(m, d, key=key), headers=t.envelope(m, d), letter=letter
    )


def _near_max_undecodable(t: Traffic, d: Draw) -> None:
    m = t.marker()
    headers = t.envelope(m, d)
    block = header_block(headers) if headers else b""
    size = t.max_payload - len(block) - d.integer(0, 2300)
    payload = (m.encode() + b" " + d.choice((b"\xfe", b"{", b"x", b"\x00")) * size)[:size]
    t.send(m, "near-max-undecodable", Expect.DEAD, "decode", payload, headers=headers)


def _huge_conversation_id(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload = t.body(m, d)
    headers = [(b"Nats-Msg-Id", f"{m}-id".encode()), (b"Ba-Conversation-Id", b"")]
    room = t.max_payload - len(header_block(headers)) - len(payload) - d.integer(0, 2300)
    headers[1] = (b"Ba-Conversation-Id", b"c" * room)
    t.send(m, "huge-conversation-id", Expect.HANDLED, None, payload, headers=headers)


def _big_text(t: Traffic, d: Draw) -> None:
    m = t.marker()
    headers: Headers = [(b"Nats-Msg-Id", f"{m}-id".encode())] if d.integer(0, 1) else []
    block = header_block(headers) if headers else b""
    bare = len(t.body(m, d, text=""))
    # the input fits max_payload by 0 to 100 bytes; the output adds its envelope (over 200 bytes)
    text = "t" * (t.max_payload - len(block) - bare - d.integer(0, 100))
    letter = {DLQ_REASON: "max_payload"}
    t.send(m, "big-text", Expect.HANDLED_DEAD, "handler", t.body(m, d, text=text), headers=headers, letter=letter)


def _deep_json(t: Traffic, d: Draw) -> None:
    m = t.marker()
    depth = d.integer(1001, 20_000)
    opener, closer = d.choice(((b"[", b"]"), (b'{"a":', b"}")))
    head = b'{"id": "' + m.encode() + b'", "key": "' + m.encode() + b'", "x": '
    payload = head + opener * depth + b"1" + closer * depth + b"}"
    letter = {DLQ_REASON: "nested too deeply"}
    t.send(m, "deep-json", Expect.DEAD, "decode", payload, headers=t.envelope(m, d), letter=letter)


def _non_token_header(t: Traffic, d: Draw) -> None:
    m = t.marker()
    name = d.choice((b"Foo(bar)", b"Foo/bar", b"Fo\xc3\xb8", b"{x}", b"Foo@bar", b"Foo,bar", b"Foo bar"))
    headers = [*t.envelope(m, d), (name, b"1")]
    # nats-py's parser drops a name that is not ASCII or has a space: busagents never sees it, to name it
    letter = {DLQ_DROPPED: "not a token"} if name.isascii() and b" " not in name else {}
    t.send(m, "non-token-header", Expect.DEAD, "decode", bad_body(m, d), headers=headers, letter=letter)


def _big_header_block(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload, expect, stage = t.body_or_bad(m, d)
    headers = t.envelope(m, d)
    size = d.integer(58 * 1024, 64 * 1024)
    count = d.integer(1, 64)
    room = size - len(header_block(headers)) - count * len(b"X-Pad-00: \r\n")
    headers += [(b"X-Pad-%02d" % i, b"p" * (room // count)) for i in range(count)]
    letter = {DLQ_DROPPED: "KiB kept"}
    t.send(m, "big-header-block", expect, stage, payload, headers=headers, letter=letter)


def _duplicate_id(t: Traffic, d: Draw) -> None:
    first = t.marker()
    for m in (first, t.marker()):
        headers = [(b"Nats-Msg-Id", f"{first}-dup".encode())]
        letter = {DLQ_MSG_ID: f"{first}-dup"}
        t.send(m, "duplicate-id", Expect.DEAD, "decode", bad_body(m, d), headers=headers, letter=letter)


def _replay_of_twice(t: Traffic, d: Draw) -> None:
    first = t.marker()
    root = d.choice((f"{first}-id", f"fz{t.run}n1q-id", "replayed-original"))
    for m in (first, t.marker()):
        headers = [(b"Ba-Replay-Of", root.encode())]
        if d.integer(0, 1):
            headers.append((b"Nats-Msg-Id", f"{m}-id".encode()))
        t.send(m, "replay-of-twice", Expect.HANDLED, None, t.body(m, d), headers=headers)


def _bad_with_reply(t: Traffic, d: Draw) -> None:
    m = t.marker()
    if d.integer(0, 1):
        payload, expect, stage = bad_body(m, d), Expect.DEAD, "decode"
        headers = t.envelope(m, d)
    else:
        payload, expect, stage = t.body(m, d), Expect.DEAD, "contract"
        headers = [(b"Ba-Contract", b"Other")]
    t.send(m, "bad-with-reply", expect, stage, payload, headers=headers, reply=f"fuzz.reply.{m}".encode())


def _non_ascii_version(t: Traffic, d: Draw) -> None:
    m = t.marker()
    version = d.choice(("\u0661", "\uff11", "\u00b9", "1\u200b"))  # Arabic-Indic, fullwidth, superscript 1; 1 + ZWSP
    headers = [*t.envelope(m, d), (b"Ba-Version", version.encode())]
    t.send(m, "non-ascii-version", Expect.DEAD, "version", t.body(m, d), headers=headers)


def _non_ascii_value(t: Traffic, d: Draw) -> None:
    m = t.marker()
    name, value = d.choice(
        (
            (b"Ba-Conversation-Id", "z\u00fcrich".encode()),
            (b"X-City", "Z\u00fcrich \u0661".encode()),
            (b"X-Bin", b"\xff\xfe"),
            (b"Ba-Sender", "\u0430\u0433\u0435\u043d\u0442".encode()),
        )
    )
    t.send(m, "non-ascii-value", Expect.HANDLED, None, t.body(m, d), headers=[*t.envelope(m, d), (name, value)])


def _over_max_payload(t: Traffic, d: Draw) -> None:
    m = t.marker()
    headers = t.envelope(m, d)
    block = header_block(headers) if headers else b""
    payload = m.encode() + b"o" * (t.max_payload - len(block) - len(m) + d.integer(1, 2300))
    t.send(m, "over-max-payload", Expect.DEAD, None, payload, headers=headers)


def _long_subject(t: Traffic, d: Draw) -> None:
    m = t.marker()
    subject = f"{t.target.subject}.{m}".encode() + b"s" * d.integer(4100, 8000)
    t.send(m, "long-subject", Expect.DEAD, None, t.body(m, d), headers=t.envelope(m, d), subject=subject)


def _not_json(t: Traffic, d: Draw) -> None:
    m = t.marker()
    payload = d.choice((b"hello " + m.encode(), b"\xff\xfe\xfd " + m.encode(), b"{" + m.encode(), b"null"))
    t.send(m, "not-json", Expect.DEAD, "decode", payload, headers=t.envelope(m, d))


def _wrong_schema(t: Traffic, d: Draw) -> None:
    m = t.marker()
    mb = m.encode()
    payload = d.choice(
        (
            b'{"id": "' + mb + b'"}',
            b'{"id": "' + mb + b'", "key": 7}',
            b'{"id": ["' + mb + b'"], "key": "k"}',
            b'{"id": "' + mb + b'", "key": "k", "text": {"a": 1}}',
            b'"' + mb + b'"',
        )
    )
    t.send(m, "wrong-schema", Expect.DEAD, "decode", payload, headers=t.envelope(m, d))


def _wrong_contract(t: Traffic, d: Draw) -> None:
    m = t.marker()
    name = d.choice((b"Other", t.target.contract.__name__.lower().encode(), b"Shipped", b"Done"))
    headers = [(b"Ba-Contract", name), (b"Ba-Version", b"1")]
    t.send(m, "wrong-contract", Expect.DEAD, "contract", t.body(m, d), headers=headers)


def _wrong_version(t: Traffic, d: Draw) -> None:
    m = t.marker()
    version = d.choice((b"2", b"0", b"1.0", b"01", b"v1", b"-1"))
    t.send(m, "wrong-version", Expect.DEAD, "version", t.body(m, d), headers=[(b"Ba-Version", version)])


def _empty_body(t: Traffic, d: Draw) -> None:
    m = t.marker()
    t.send(m, "empty-body", Expect.DEAD, "decode", b"", headers=t.envelope(m, d))


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("valid", "valid (busagents' headers, some, or none)", _valid),
        Kind("replay-of-twice", "two different valid messages with one Ba-Replay-Of", _replay_of_twice),
        Kind("status-not-utf8", "header status line not UTF-8 (NATS/1.0 \\xff\\xfe\\xfd)", _status_not_utf8),
        Kind("no-line-end", "header block with no line end (NATS/1.0 alone)", _no_line_end),
        Kind("subject-not-utf8", "subject not UTF-8", _subject_not_utf8),
        Kind("reply-not-utf8", "reply subject not UTF-8", _reply_not_utf8),
        Kind("long-key", "valid, key of 4,100-8,000 characters (output subject too long)", _long_key),
        Kind("near-max-undecodable", "undecodable, within 2.3 KB of max_payload", _near_max_undecodable),
        Kind("huge-conversation-id", "valid, Ba-Conversation-Id of ~1 MiB", _huge_conversation_id),
        Kind("big-text", "valid, ~1 MB text copied into the output (too large)", _big_text),
        Kind("deep-json", "JSON nested 1,001-20,000 levels", _deep_json),
        Kind("non-token-header", "header name not a token (Foo(bar): 1), undecodable", _non_token_header),
        Kind("big-header-block", "header block of 58-64 KiB", _big_header_block),
        Kind("duplicate-id", "two bad messages with one Nats-Msg-Id", _duplicate_id),
        Kind("bad-with-reply", "bad event with a reply subject", _bad_with_reply),
        Kind("non-ascii-version", "Ba-Version: \u0661 (not ASCII)", _non_ascii_version),
        Kind("non-ascii-value", "valid, a header value not ASCII", _non_ascii_value),
        Kind("over-max-payload", "over max_payload (the server refuses it)", _over_max_payload),
        Kind("long-subject", "subject over the 4,096-byte control line (the server refuses it)", _long_subject),
        Kind("not-json", "not JSON", _not_json),
        Kind("wrong-schema", "JSON of another schema", _wrong_schema),
        Kind("wrong-contract", "wrong Ba-Contract", _wrong_contract),
        Kind("wrong-version", "wrong Ba-Version", _wrong_version),
        Kind("empty-body", "empty body", _empty_body),
    )
}
VALID = ("valid", "replay-of-twice")
HOSTILE = tuple(name for name in KINDS if name not in VALID)
OTHERS = tuple(name for name in KINDS if name != "valid")


# The raw wire


class Wire:
    """A plain TCP connection to nats-server speaking the protocol by hand; a new one after the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 4222
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connections = 0

    async def send(self, frame: bytes) -> str | None:
        """Send one message and a PING: None once the server answered PONG, else what it said when it refused."""
        if self.writer is None:
            await self._open()
        assert self.writer is not None
        self.writer.write(frame + b"PING\r\n")
        with contextlib.suppress(ConnectionError):  # the server may close mid-frame: read why below
            await self.writer.drain()
        return await self._pong()

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**20)
        self.connections += 1
        await asyncio.wait_for(self.reader.readline(), QUICK)  # INFO
        self.writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\nPING\r\n')
        await self.writer.drain()
        error = await self._pong()
        if error is not None:
            raise ConnectionError(f"nats-server refused a plain CONNECT: {error}")

    async def _pong(self) -> str | None:
        assert self.reader is not None and self.writer is not None
        error: str | None = None
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), QUICK)
            except ConnectionError as exc:
                line, error = b"", error or f"connection reset ({exc})"
            if not line:
                await self.close()
                return error or "the server closed the connection"
            if line == b"PONG\r\n":
                return error
            if line == b"PING\r\n":
                self.writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                error = line.decode("utf-8", "replace").strip()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# What the agent does, as seen on the bus


class Watch:
    """Outputs, dead letters, JetStream acks and replies of one agent, as they are published."""

    def __init__(self, bus: Bus, target: Target) -> None:
        self.bus = bus
        self.target = target
        self.outputs: Counter[str] = Counter()
        self.letters: Counter[str] = Counter()
        self.acks: dict[str, dict[str, Any]] = {}
        self.replies: list[str] = []  # what the agent sent to a reply subject
        self.unmatched: list[str] = []  # outputs or dead letters of no message sent
        self.pending: dict[str, Sent] = {}
        self.mine: set[str] = set()  # markers of the messages sent to this agent
        self.changed = asyncio.Event()

    async def start(self) -> None:
        nc = self.bus.nc
        many, big = 2**20, 2**31  # dead letters of ~1 MiB: never a slow consumer
        self.subs = [
            await nc.subscribe(
                f"{self.target.output_subject}.>", cb=self._output, pending_msgs_limit=many, pending_bytes_limit=big
            ),
            await nc.subscribe(
                dead_letter_subject(self.target.name), cb=self._letter, pending_msgs_limit=many, pending_bytes_limit=big
            ),
            await nc.subscribe("fuzz.ack.>", cb=self._reply),
            await nc.subscribe("fuzz.reply.>", cb=self._reply),
        ]
        await self.bus.flush()

    async def stop(self) -> None:
        for sub in self.subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def expect(self, sent: Sent) -> None:
        self.pending[sent.marker] = sent
        self.mine.add(sent.marker)

    def refused(self, sent: Sent, why: str) -> None:
        sent.refused = why
        self._settle(sent.marker)

    def done(self, sent: Sent) -> bool:
        if sent.refused is not None:
            return True
        if self.target.durable and sent.marker not in self.acks:
            return False
        if sent.expect is Expect.HANDLED:
            return self.outputs[sent.marker] > 0
        return self.letters[sent.marker] > 0

    def _settle(self, marker: str) -> None:
        sent = self.pending.get(marker)
        if sent is not None and self.done(sent):
            del self.pending[marker]
        self.changed.set()

    async def _output(self, msg: Msg) -> None:
        found = _MARKER.search(msg.subject)
        if found is None:
            self.unmatched.append(f"output on {msg.subject[:80]!r}")
            return
        self.outputs[found.group()] += 1
        self._settle(found.group())

    async def _letter(self, msg: Msg) -> None:
        found = _MARKER.search((msg.headers or {}).get(DLQ_SUBJECT, ""))
        if found is None:
            self.unmatched.append(f"dead letter of {(msg.headers or {}).get(DLQ_SUBJECT, '')[:80]!r}")
            return
        self.letters[found.group()] += 1
        self._settle(found.group())

    async def _reply(self, msg: Msg) -> None:
        """On a reply subject: JetStream's answer to a durable publish, else something the agent must not send."""
        found = _MARKER.search(msg.subject)
        if found is None or found.group() not in self.mine:
            return  # another agent's
        headers = msg.headers or {}
        try:
            ack = json.loads(msg.data) if self.target.durable and not headers else None
        except ValueError:
            ack = None
        if not isinstance(ack, dict) or not ("stream" in ack or "error" in ack):
            self.replies.append(f"{msg.subject[:80]!r}: headers {dict(headers)!r}, {msg.data[:80]!r}")
            return
        marker = found.group()
        sent = self.pending.get(marker)
        if sent is None:
            return
        self.acks[marker] = ack
        if "error" in ack:
            self.refused(sent, f"JetStream: {ack['error'].get('description', ack['error'])}")
        elif ack.get("duplicate"):
            self.refused(sent, "JetStream: a duplicate of a stored message (same Nats-Msg-Id)")
        else:
            self._settle(marker)

    async def until_done(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.pending:
                    self.changed.clear()
                    await self.changed.wait()


# A run


@dataclass
class Run:
    """What one agent made of the traffic sent to it."""

    target: Target
    messages: list[Sent]
    effects: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    letters: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # marker -> headers of each
    replies: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    never_settled: list[str] = field(default_factory=list)  # no outcome seen (nor JetStream's ack) in time
    probes: list[float] = field(default_factory=list)  # seconds from a valid message to its output
    answered_in: float | None = None  # the valid message sent last
    connections: int = 0  # raw connections opened (one more after each the server closed)
    seconds: float = 0.0


async def run_traffic(
    bus: Bus,
    target: Target,
    messages: list[Sent],
    db: Path,
    *,
    window: int = 64,
    settle: float = 30.0,
    probe_every: float = 0.0,
) -> Run:
    """Send ``messages`` on a raw connection, ``window`` unsettled at most; collect what the agent made of them.

    ``probe_every`` > 0 also sends a valid message that often from ``bus`` and times its answer.
    """
    url = bus.url
    run = Run(target, list(messages))
    watch = Watch(bus, target)
    wire = Wire(url)
    dlq_from = await _dlq_next_seq(bus)
    started = time.monotonic()
    await watch.start()
    stop_probing = asyncio.Event()
    probing = None
    if probe_every > 0:
        probing = asyncio.create_task(_probe(bus, target, run, watch, probe_every, stop_probing))
    try:
        for sent in messages:
            while len(watch.pending) >= window:
                watch.changed.clear()
                try:
                    await asyncio.wait_for(watch.changed.wait(), settle)
                except TimeoutError:
                    break  # the agent stalled: send on, verify() names what never settled
            watch.expect(sent)
            refused = await wire.send(sent.frame)
            if refused is not None:
                watch.refused(sent, f"nats-server: {refused}")
        await wire.close()
        await watch.until_done(settle)
        stop_probing.set()
        if probing is not None:
            await probing
        run.answered_in = await _ask(bus, target, run, watch, "final", QUICK)
        run.never_settled = [f"{s.marker} ({s.kind})" for s in watch.pending.values()]
        if target.durable:
            await _settled(bus, ORDERS.stream or "", target.name, settle)
        run.seconds = time.monotonic() - started
        run.effects = effect_counts(str(db))
        run.outputs = await _stored_outputs(bus) if target.durable else dict(watch.outputs)
        run.letters = await _dead_letters(bus, target, dlq_from)
    finally:
        stop_probing.set()
        if probing is not None and not probing.done():
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
        await watch.stop()
        await wire.close()
    run.replies = watch.replies
    run.unmatched = watch.unmatched
    run.connections = wire.connections
    return run


async def _probe(bus: Bus, target: Target, run: Run, watch: Watch, every: float, stop: asyncio.Event) -> None:
    """Send a valid message every ``every`` seconds and time its answer, until ``stop``."""
    while not stop.is_set():
        taken = await _ask(bus, target, run, watch, "probe", 60.0)
        if taken is not None:
            run.probes.append(taken)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def _ask(bus: Bus, target: Target, run: Run, watch: Watch, kind: str, timeout: float) -> float | None:
    """Publish a valid message with busagents; the seconds until its output was seen, None if not within ``timeout``."""
    marker = f"fzffffffn{secrets.randbelow(10**12)}q"  # not random: hypothesis seeds it per example
    sent = Sent(marker, kind, b"", Expect.HANDLED, None, True, "")
    run.messages.append(sent)
    watch.expect(sent)
    if target.durable:
        watch.acks[marker] = {"stream": ORDERS.stream}  # bus.publish returns once JetStream stored it
    begun = time.monotonic()
    await bus.publish(target.contract(id=marker, key=marker, text=kind))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while watch.outputs[marker] == 0:
                watch.changed.clear()
                await watch.changed.wait()
            return time.monotonic() - begun
    return None


async def _settled(bus: Bus, stream: str, consumer: str, timeout: float) -> None:
    """Wait until the durable consumer has nothing pending nor unacknowledged."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                info = await bus.js.consumer_info(stream, consumer)
                if not info.num_pending and not info.num_ack_pending:
                    return
                await asyncio.sleep(0.05)  # polling the server's own account of the consumer


async def _stored_outputs(bus: Bus) -> dict[str, int]:
    """Durable outputs stored, per marker (from the stream's per-subject counts)."""
    info = await bus.js.stream_info(SHIPPED.stream or "", subjects_filter=f"{DURABLE.output_subject}.>")
    counts: dict[str, int] = defaultdict(int)
    for subject, count in (info.state.subjects or {}).items():
        found = _MARKER.search(subject)
        if found is not None:
            counts[found.group()] += count
    return dict(counts)


async def _dlq_next_seq(bus: Bus) -> int:
    try:
        info = await bus.js.stream_info(DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return 1
    return info.state.last_seq + 1


async def _dead_letters(bus: Bus, target: Target, first: int) -> dict[str, list[dict[str, str]]]:
    """The headers of the agent's dead letters stored from ``first`` on, per marker of the original's subject."""
    subject = dead_letter_subject(target.name)
    found: dict[str, list[dict[str, str]]] = defaultdict(list)
    seq = first
    while True:
        try:
            raw = await bus.js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        headers = stored_headers(raw)
        marker = _MARKER.search(headers.get(DLQ_SUBJECT, ""))
        found[marker.group() if marker else "?"].append(headers)
        assert raw.seq is not None
        seq = raw.seq + 1
    return dict(found)


# Verdict


def verify(run: Run) -> list[str]:
    """What went wrong, one line per message (empty: every message became what it must)."""
    problems: list[str] = []
    for sent in run.messages:
        effects = run.effects.get(sent.marker, 0)
        outputs = run.outputs.get(sent.marker, 0)
        letters = run.letters.get(sent.marker, [])
        if sent.refused is not None:
            want = (0, 0, 0)
        else:
            want = (
                int(sent.expect is not Expect.DEAD),
                int(sent.expect is Expect.HANDLED),
                int(sent.expect is not Expect.HANDLED),
            )
        got = (effects, outputs, len(letters))
        where = f"{run.target.name} {sent.kind} {sent.marker}"
        if sent.refused is not None and sent.valid:
            problems.append(f"{where}: a valid message was refused: {sent.refused}")
        if got != want:
            what = f"refused ({sent.refused})" if sent.refused is not None else sent.expect.value
            problems.append(f"{where}: expected {what}: (effects, outputs, dead letters) = {got}, not {want}")
        for letter in letters:
            if not letter.get(DLQ_REASON):
                problems.append(f"{where}: a dead letter without a reason: {letter}")
                continue
            if sent.stage is not None and letter.get(DLQ_STAGE) != sent.stage:
                problems.append(
                    f"{where}: dead letter at stage {letter.get(DLQ_STAGE)!r}, not {sent.stage!r}: "
                    f"{letter.get(DLQ_REASON)}"
                )
            for name, text in sent.letter.items():
                if text not in letter.get(name, ""):
                    problems.append(f"{where}: its dead letter's {name} is {letter.get(name)!r}, without {text!r}")
    if run.never_settled:
        shown = ", ".join(run.never_settled[:10])
        problems.append(f"{run.target.name}: {len(run.never_settled)} message(s) never settled: {shown}")
    problems += [f"{run.target.name}: the agent sent to a reply subject: {r}" for r in run.replies]
    problems += [f"{run.target.name}: {u}" for u in run.unmatched]
    if "?" in run.letters:
        problems.append(f"{run.target.name}: {len(run.letters['?'])} dead letter(s) of no message sent")
    if run.answered_in is None:
        problems.append(f"{run.target.name}: no answer to a valid message within {QUICK}s at the end")
    return problems


def tally(run: Run) -> dict[str, Counter[str]]:
    """Per kind: sent, refused, and each outcome."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    for sent in run.messages:
        row = table[sent.kind]
        row["sent"] += 1
        if sent.refused is not None:
            row["refused"] += 1
            row[f"refused: {_short(sent.refused)}"] += 1
            continue
        row["effects"] += run.effects.get(sent.marker, 0)
        row["outputs"] += run.outputs.get(sent.marker, 0)
        row["dead letters"] += len(run.letters.get(sent.marker, []))
    return table


def _short(reason: str) -> str:
    return re.sub(r"\d+", "N", reason)[:90]


# python -m benchmarks.hostile


async def _bench(messages: int, seed: int, window: int, out: Path) -> int:
    problems: list[str] = []
    async with NatsServer(store_dir=out / "nats") as server:
        procs = {
            t.name: spawn_agent(t, server.url, out / f"{t.name}.db", out / f"{t.name}.log", log_level="ERROR")
            for t in (CORE, DURABLE)
        }
        bus = await Bus.connect(server.url, name="fuzz-bench")
        try:
            await bus.wait_for_agents(procs, timeout=60)
            draw = RandomDraw(seed)
            for i, target in enumerate((CORE, DURABLE)):
                proc = psutil.Process(procs[target.name].pid)
                rss_before = proc.memory_info().rss / 2**20
                traffic = Traffic(target, f"{(2 * seed + i) % 2**24:06x}", bus.nc.max_payload)
                while len(traffic.messages) < messages:
                    traffic.add_mixed(draw)
                run = await run_traffic(
                    bus, target, traffic.messages, out / f"{target.name}.db", window=window, probe_every=0.25
                )
                rss_after = proc.memory_info().rss / 2**20
                alive = procs[target.name].poll() is None
                found = verify(run)
                problems += found
                _print_run(run, rss_before, rss_after, alive, found)
                if not alive:
                    problems.append(f"{target.name}: the process exited with {procs[target.name].returncode}")
        finally:
            await bus.close()
            for proc in procs.values():
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for line in problems[:50]:
        print("PROBLEM", line)
    return 1 if problems else 0


def _print_run(run: Run, rss_before: float, rss_after: float, alive: bool, problems: list[str]) -> None:
    table = tally(run)
    hostile = sum(1 for s in run.messages if s.kind in HOSTILE)
    print(f"\n## {run.target.name}: {len(run.messages)} messages ({hostile} hostile) in {run.seconds:.1f} s")
    print(f"{'kind':<22} {'sent':>6} {'effects':>8} {'outputs':>8} {'dead letters':>13} {'refused':>8}")
    for kind in (*KINDS, "probe", "final"):
        row = table.get(kind)
        if row:
            print(
                f"{kind:<22} {row['sent']:>6} {row['effects']:>8} {row['outputs']:>8} "
                f"{row['dead letters']:>13} {row['refused']:>8}"
            )
            for key, count in row.items():
                if key.startswith("refused: "):
                    print(f"{'':<22} {count:>6} {key}")
    duplicated = sum(1 for n in run.effects.values() if n > 1)
    letters = sum(len(found) for found in run.letters.values())
    by_server = sum(1 for s in run.messages if (s.refused or "").startswith("nats-server"))
    by_jetstream = sum(1 for s in run.messages if (s.refused or "").startswith("JetStream"))
    print(f"dead letters {letters}; refused by nats-server {by_server}, by JetStream {by_jetstream}")
    print(f"effects applied twice or more: {duplicated}; raw connections opened: {run.connections}")
    if run.probes:
        print(f"probes: {len(run.probes)}, slowest answer {max(run.probes) * 1000:.0f} ms")
    answered = f"{run.answered_in * 1000:.0f} ms" if run.answered_in is not None else "NO ANSWER"
    print(f"final valid message answered in {answered}; process alive: {alive}")
    print(f"RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after; problems: {len(problems)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="per agent (default 10,000)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--window", type=int, default=64, help="messages unsettled at most")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="busagents-hostile-") as tmp:
        return asyncio.run(_bench(args.messages, args.seed, args.window, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
