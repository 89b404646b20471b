"""Dead letters: messages an agent could not handle, kept with the reason in the ``BUSAGENTS_DLQ`` stream.

This module owns them: the ``Ba-Dlq-*`` headers, building one from the original message
(core, durable, or the message a max-deliveries advisory names), writing it, the stream,
reading and replaying. A dead letter (``busagents.dlq.<agent>``) always fits the server's
limits, whatever the original carried:

* the original headers are copied only when the name is an HTTP token and the value printable
  ASCII, and never ``Nats-*`` ones (JetStream would act on them: an expected stream, a rollup)
  nor ``Ba-Dlq-*`` ones; at most 16 KiB of them. ``Ba-Dlq-Dropped-Headers`` names the others;
* the reason is one printable line of at most 2,000 characters, the original ``Nats-Msg-Id``
  (in ``Ba-Dlq-Msg-Id``) at most 256 printable ASCII characters;
* the body is cut so that headers and body fit the server's ``max_payload``;
  ``Ba-Dlq-Truncated`` then gives the original size (such a dead letter is not replayed).

Each dead letter has its own ``Nats-Msg-Id``, never one the sender chose: a durable message's
is ``dlq.<agent>.<stream>.<stream sequence>``, the same on every redelivery, so it is stored
once however often the worker dies before terminating the message; a core message's is new.

A replay publishes the original body and headers on the original subject with a new
``Nats-Msg-Id`` per attempt (so a second replay is delivered too) and ``Ba-Replay-Of:
<original id>``, which handlers see as ``ctx.message_id``: an idempotent handler still
recognises an effect that did happen before the message died. A subject that a stream
captures is replayed through JetStream (stored, with an ack); any other on core NATS, and
that fails when no one subscribes to it.
"""

from __future__ import annotations

import base64
import datetime
import email.header
import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .durable import create_or_update_stream, delivery_count, stream_sequence
from .envelope import MSG_ID, REPLAY_OF, new_id
from .errors import BusagentsError, ConfigError
from .subjects import DLQ_PREFIX, DLQ_SUBJECTS, dead_letter_subject

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from .bus import Bus

__all__ = [
    "DLQ_AGENT",
    "DLQ_DELIVERIES",
    "DLQ_DROPPED",
    "DLQ_MSG_ID",
    "DLQ_PREFIX",
    "DLQ_REASON",
    "DLQ_STAGE",
    "DLQ_STREAM",
    "DLQ_SUBJECT",
    "DLQ_SUBJECTS",
    "DLQ_TRUNCATED",
    "DeadLetter",
    "ReplayError",
    "Replayed",
    "bounded_reason",
    "build_dead_letter",
    "dead_letter_subject",
    "dead_letters",
    "dlq_permissions",
    "ensure_dlq_stream",
    "get_dead_letter",
    "replay_dead_letter",
    "stored_headers",
    "write_dead_letter",
    "write_durable_dead_letter",
    "write_max_deliveries_dead_letter",
]

#: The stream that keeps every dead letter (``busagents.dlq.>``) for ``busagents dlq``.
DLQ_STREAM = "BUSAGENTS_DLQ"

DLQ_REASON = "Ba-Dlq-Reason"
DLQ_SUBJECT = "Ba-Dlq-Subject"
DLQ_AGENT = "Ba-Dlq-Agent"
DLQ_STAGE = "Ba-Dlq-Stage"  # decode | contract | version | handler | max-deliveries
DLQ_DELIVERIES = "Ba-Dlq-Deliveries"
DLQ_MSG_ID = "Ba-Dlq-Msg-Id"  # the original Nats-Msg-Id (the dead letter has its own)
DLQ_TRUNCATED = "Ba-Dlq-Truncated"  # the original body's size, when the body was cut to fit
DLQ_DROPPED = "Ba-Dlq-Dropped-Headers"  # original headers not copied, and why

MAX_REASON = 2000
MAX_COPIED_HEADERS = 16 * 1024  # JetStream refuses a header block over 64 KiB
_MAX_ID = 256
_MAX_DROPPED = 1000
_MAX_NAME = 64
_BLOCK_OVERHEAD = len(b"NATS/1.0\r\n\r\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token, as nats-py checks a header name
_PRINTABLE_ASCII = re.compile(r"[ -~]*")
_RESERVED = ("nats-", "ba-dlq-")  # JetStream acts on Nats-* (expected stream, rollup, TTL); ours


class ReplayError(BusagentsError):
    """A dead letter could not be replayed: what was wrong, and it was not deleted."""


# Building and writing


def bounded_reason(reason: str) -> str:
    """The reason as one printable line of at most 2,000 characters (a header value, an error reply)."""
    line = " ".join(reason.split())
    if not line.isprintable():
        line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line)
    return line[:MAX_REASON]


def build_dead_letter(
    agent: str,
    stage: str,
    reason: str,
    *,
    subject: str,
    data: bytes,
    headers: Mapping[Any, Any] | None,
    msg_id: str,
    max_payload: int,
    deliveries: int | None = None,
) -> tuple[dict[str, str], bytes]:
    """The headers and body of the dead letter of a message (see the module doc: it always fits)."""
    out: dict[str, str] = {}
    dropped: list[str] = []
    original_id = ""
    budget = MAX_COPIED_HEADERS
    for key, raw_value in (headers or {}).items():
        name, value = _text(key), _text(raw_value)
        if name == MSG_ID:
            original_id = value
            continue
        why = _not_copied(name, value)
        if why is None:
            size = len(name) + len(value) + 4
            if size <= budget:
                out[name] = value
                budget -= size
                continue
            why = f"over the {MAX_COPIED_HEADERS // 1024} KiB kept"
        dropped.append(f"{_escaped(name, _MAX_NAME)} ({why})")
    out[DLQ_REASON] = bounded_reason(reason)
    out[DLQ_SUBJECT] = subject
    out[DLQ_AGENT] = agent
    out[DLQ_STAGE] = stage
    if deliveries is not None:
        out[DLQ_DELIVERIES] = str(deliveries)
    if original_id:
        out[DLQ_MSG_ID] = _escaped(original_id, _MAX_ID)
    if dropped:
        out[DLQ_DROPPED] = _cut("; ".join(dropped), _MAX_DROPPED)
    out[MSG_ID] = msg_id
    if _block_size(out) + len(data) > max_payload:
        out[DLQ_TRUNCATED] = str(len(data))
        data = data[: max(0, max_payload - _block_size(out))]
    return out, data


async def write_dead_letter(
    bus: Bus,
    agent: str,
    stage: str,
    reason: str,
    *,
    subject: str,
    data: bytes,
    headers: Mapping[Any, Any] | None,
    store: bool,
    origin: tuple[str, int] | None = None,
    deliveries: int | None = None,
) -> None:
    """Send the dead letter of a message: stored with an ack when ``store`` (raises if it was not), else on core NATS.

    ``origin`` is the stream and sequence of a durable message, from which its dead letter's id is made.
    """
    stream, seq = origin or ("", 0)
    msg_id = f"dlq.{agent}.{stream}.{seq}" if stream and seq else new_id()
    out, body = build_dead_letter(
        agent,
        stage,
        reason,
        subject=subject,
        data=data,
        headers=headers,
        msg_id=msg_id,
        max_payload=bus.nc.max_payload,
        deliveries=deliveries,
    )
    if store:
        await bus.js.publish(dead_letter_subject(agent), body, timeout=5.0, headers=out)
    else:
        await bus.nc.publish(dead_letter_subject(agent), body, headers=out)


async def write_durable_dead_letter(bus: Bus, agent: str, msg: Msg, subject: str, stage: str, reason: str) -> None:
    """Store the dead letter of a JetStream message (raises if it was not stored)."""
    await write_dead_letter(
        bus,
        agent,
        stage,
        reason,
        subject=subject,
        data=msg.data,
        headers=msg.headers,
        store=True,
        origin=stream_sequence(msg.reply),
        deliveries=delivery_count(msg.reply),
    )


async def write_max_deliveries_dead_letter(bus: Bus, agent: str, advisory: Msg) -> str:
    """Store the dead letter of the message a MAX_DELIVERIES advisory names; returns the reason.

    Raises ValueError for an advisory that is not about the stream it was sent for.
    """
    # $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>: the subject the worker subscribed to
    stream = advisory.subject.split(".")[5]
    info = json.loads(advisory.data)
    if not isinstance(info, dict) or info.get("stream") != stream:
        raise ValueError(f"an advisory on {advisory.subject} that is not about {stream}")
    seq, deliveries = int(info["stream_seq"]), int(info["deliveries"])
    raw = await bus.js.get_msg(stream, seq=seq)
    reason = f"delivered {deliveries} times and never settled: the handler's process died or hung each time"
    await write_dead_letter(
        bus,
        agent,
        "max-deliveries",
        reason,
        subject=raw.subject or "",
        data=raw.data or b"",
        headers=stored_headers(raw),
        store=True,
        origin=(stream, seq),
        deliveries=deliveries,
    )
    return reason


def _not_copied(name: str, value: str) -> str | None:
    """Why an original header is not copied into its dead letter, or None."""
    if not _TOKEN.fullmatch(name):
        return "not a token"
    if name.lower().startswith(_RESERVED):
        return "reserved"
    if not _PRINTABLE_ASCII.fullmatch(value):
        return "not printable ASCII"
    return None


def _block_size(headers: dict[str, str]) -> int:
    """Bytes of the header block nats-py sends for ``headers`` (at most)."""
    return _BLOCK_OVERHEAD + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def _escaped(text: str, limit: int) -> str:
    """``text`` as printable ASCII (others escaped, as in Python), cut to ``limit`` characters."""
    if len(text) <= limit and _PRINTABLE_ASCII.fullmatch(text):
        return text
    escaped = "".join(c if " " <= c <= "~" else c.encode("unicode_escape").decode() for c in text[: limit + 1])
    return _cut(escaped, limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(value: Any) -> str:
    """A header name or value as str, whatever nats-py made of it (str, bytes, an email Header, a str enum)."""
    if type(value) is str:
        return value
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, email.header.Header):  # nats-py's get_msg, for a non-ASCII value
        parts = email.header.decode_header(value)
        return "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p, _ in parts)
    return str(value)


# The stream


async def ensure_dlq_stream(js: JetStreamContext, *, replicas: int = 1, max_age: float = 30 * 24 * 3600.0) -> str:
    """Create or update the stream that keeps every dead letter."""
    config = api.StreamConfig(
        name=DLQ_STREAM,
        description="busagents: dead letters of every agent",
        subjects=[DLQ_SUBJECTS],
        retention=api.RetentionPolicy.LIMITS,
        max_age=max_age,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
        duplicate_window=120.0,
    )
    return await create_or_update_stream(js, config)


def dlq_permissions(agent: str) -> set[str]:
    """NATS publish permissions an agent needs to keep its dead letters in :data:`DLQ_STREAM`."""
    return {
        f"$JS.API.STREAM.CREATE.{DLQ_STREAM}",  # every worker ensures the stream
        f"$JS.API.STREAM.UPDATE.{DLQ_STREAM}",
        dead_letter_subject(agent),  # stored with an ack
    }


# Reading


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One stored dead letter."""

    seq: int
    time: datetime.datetime | None
    agent: str
    stage: str
    reason: str
    subject: str  # where the original was published
    original_id: str | None
    deliveries: int | None
    truncated: int | None  # the original body's size, when only part of it was kept
    headers: dict[str, str]
    data: bytes

    def replay_headers(self) -> dict[str, str]:
        """The original headers that can be sent again, with a new id and ``Ba-Replay-Of`` (see module doc)."""
        headers = {k: v for k, v in self.headers.items() if _not_copied(k, v) is None}
        root = self.headers.get(REPLAY_OF) or self.original_id
        if root:
            headers[REPLAY_OF] = _escaped(root, _MAX_ID)
        headers[MSG_ID] = f"replay.{self.seq}.{new_id()}"
        return headers


def stored_headers(raw: api.RawStreamMsg) -> dict[str, str]:
    """The headers of a message read from a stream, every value a str (nats-py may give email Headers)."""
    if raw.hdrs:
        headers: dict[str, str] = {}
        for line in base64.b64decode(raw.hdrs).split(b"\r\n")[1:]:  # after NATS/1.0
            name, sep, value = line.partition(b":")
            if sep and name.strip():
                headers[name.strip().decode("utf-8", "replace")] = value.strip().decode("utf-8", "replace")
        return headers
    return {_text(k): _text(v) for k, v in (raw.headers or {}).items()}


async def get_dead_letter(bus: Bus, seq: int) -> DeadLetter:
    """The dead letter stored at ``seq``; ConfigError when there is none."""
    try:
        raw = await bus.js.get_msg(DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        raise ConfigError(f"no dead letter #{seq} in {DLQ_STREAM}") from None
    return _read(raw, seq)


async def dead_letters(bus: Bus, *, agent: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters still kept (of one agent, or all)."""
    try:
        info = await bus.js.stream_info(DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    subject = dead_letter_subject(agent) if agent else DLQ_SUBJECTS
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    while len(found) < limit and seq <= info.state.last_seq:
        try:
            raw = await bus.js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        assert raw.seq is not None
        found.append(_read(raw, raw.seq))
        seq = raw.seq + 1
    return found


def _read(raw: api.RawStreamMsg, seq: int) -> DeadLetter:
    headers = stored_headers(raw)
    return DeadLetter(
        seq=raw.seq or seq,
        time=raw.time,
        agent=headers.get(DLQ_AGENT) or (raw.subject or "").removeprefix(DLQ_PREFIX + "."),
        stage=headers.get(DLQ_STAGE, ""),
        reason=headers.get(DLQ_REASON, ""),
        subject=headers.get(DLQ_SUBJECT, ""),
        original_id=headers.get(DLQ_MSG_ID) or None,
        deliveries=_count(headers.get(DLQ_DELIVERIES)),
        truncated=_count(headers.get(DLQ_TRUNCATED)),
        headers=headers,
        data=raw.data or b"",
    )


def _count(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() and len(value) < 20 else None


# Replay


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay did: the id it sent, and the stream and sequence it was stored at (None: core NATS)."""

    msg_id: str
    stream: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        if self.stream is None:
            return f"as {self.msg_id}, delivered on core NATS"
        return f"as {self.msg_id}, stored in {self.stream} #{self.seq}"


async def replay_dead_letter(bus: Bus, letter: DeadLetter, *, delete: bool = False) -> Replayed:
    """Publish the original message again on its subject; with ``delete``, drop the dead letter once it was.

    Through JetStream (with an ack) when a stream captures the subject, else on core NATS.
    Raises ReplayError, and keeps the dead letter, when nothing took the message.
    """
    if not letter.subject:
        raise ReplayError(f"dead letter #{letter.seq} has no {DLQ_SUBJECT} header: cannot tell where to replay it")
    if letter.truncated is not None:
        raise ReplayError(
            f"dead letter #{letter.seq} kept {len(letter.data)} of the original's {letter.truncated} bytes: "
            "replaying it would send a different message"
        )
    headers = letter.replay_headers()
    msg_id = headers[MSG_ID]
    try:
        stream: str | None = await bus.js.find_stream_name_by_subject(letter.subject)
    except nats.js.errors.NotFoundError:
        stream = None
    if stream is not None:
        try:
            ack = await bus.js.publish(letter.subject, letter.data, timeout=5.0, stream=stream, headers=headers)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise ReplayError(
                f"dead letter #{letter.seq}: {stream} did not store the replay on {letter.subject}: {exc!r}"
            ) from None
        if ack.duplicate:
            raise ReplayError(f"dead letter #{letter.seq}: {stream} dropped the replay {msg_id} as a duplicate")
        replayed = Replayed(msg_id, ack.stream, ack.seq)
    else:
        await _publish_core(bus, letter, headers)
        replayed = Replayed(msg_id)
    if delete:
        await bus.js.delete_msg(DLQ_STREAM, letter.seq)
    return replayed


async def _publish_core(bus: Bus, letter: DeadLetter, headers: dict[str, str]) -> None:
    """Publish on core NATS; ReplayError when no one subscribes to the subject (nothing got it)."""
    inbox = bus.nc.new_inbox()
    answers = await bus.nc.subscribe(inbox)
    try:
        await bus.nc.publish(letter.subject, letter.data, reply=inbox, headers=headers)
        # the server answers "no responders" (503) at once when no one subscribes, so before the flush's PONG
        await bus.flush()
        while answers.pending_msgs:
            answer = await answers.next_msg(timeout=1.0)
            if (answer.headers or {}).get("Status") == "503":
                raise ReplayError(
                    f"dead letter #{letter.seq}: no one subscribes to {letter.subject} on core NATS, so no one "
                    "got the replay; start the agent first"
                )
    finally:
        await answers.unsubscribe()
