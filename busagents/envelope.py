"""The envelope: message metadata carried in NATS headers, never in the body.

Header names (all plain ASCII strings, so an agent in any language can read them):

========================  ==============================================================
``Nats-Msg-Id``           message id (JetStream de-duplicates on it)
``Ba-Contract``           contract name
``Ba-Version``            contract version (integer)
``Ba-Conversation-Id``    the conversation this message belongs to, kept across every hop
``Ba-Causation-Id``       id of the message that caused this one (absent for a root message)
``Ba-Sender``             name of the sending agent
``Ba-Sent-At``            send time, integer nanoseconds since the Unix epoch
``traceparent``           W3C trace context (filled by telemetry when enabled)
``tracestate``            W3C trace state
``Ba-Replay-Of``          id of the dead letter's original message, on a replayed message
``Ba-Llm``                the model calls that decided this message (``<model> calls=<n> tokens=<t>
                          source=<model|offline|review>``), set through :meth:`Context.note_llm`
========================  ==============================================================

The ids (message, conversation, causation) are copied from a message into the messages it
causes, so they are bounded: an id longer than 256 characters, or with a character that is
not printable ASCII (spaces included: header values are stripped on the wire), is replaced
by ``~`` and 22 characters of its digest. The same id always gives the same replacement, so
redeliveries and de-duplication still agree, and a hostile 1 MiB conversation id cannot make
every output too large to send.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import secrets
import string
import time
from typing import Any

import msgspec

__all__ = [
    "CAUSATION_ID",
    "CONTRACT",
    "CONVERSATION_ID",
    "LLM",
    "MAX_ID",
    "MSG_ID",
    "REPLAY_OF",
    "SENDER",
    "SENT_AT",
    "TRACEPARENT",
    "TRACESTATE",
    "VERSION",
    "Envelope",
    "bounded_id",
    "new_id",
]

MSG_ID = "Nats-Msg-Id"
CONTRACT = "Ba-Contract"
VERSION = "Ba-Version"
CONVERSATION_ID = "Ba-Conversation-Id"
CAUSATION_ID = "Ba-Causation-Id"
SENDER = "Ba-Sender"
SENT_AT = "Ba-Sent-At"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
REPLAY_OF = "Ba-Replay-Of"
LLM = "Ba-Llm"

_ALPHABET = string.digits + string.ascii_letters
#: The longest id kept as it is (see the module doc).
MAX_ID = 256
_COUNTER_LIMIT = 16**10


class _Ids:
    """The NUID scheme (a random prefix, then a counter) without NUID's per-id base-62 loop (3-5 us)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = "".join(secrets.choice(_ALPHABET) for _ in range(12))
        self.counter = itertools.count(secrets.randbelow(1 << 32))

    def next(self) -> str:
        n = next(self.counter)
        if n >= _COUNTER_LIMIT:
            self.reset()
            n = next(self.counter)
        return f"{self.prefix}{n:010x}"


_ids = _Ids()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reset)  # a forked child must not repeat its parent's ids


def new_id() -> str:
    """A new unique message id: 22 letters and digits, a random per-process prefix and a counter."""
    return _ids.next()


def bounded_id(value: str) -> str:
    """``value`` when it is at most :data:`MAX_ID` printable ASCII characters without spaces, else its digest.

    The digest is ``~`` and 22 URL-safe base-64 characters, the same for the same ``value``.
    """
    if len(value) <= MAX_ID and value.isascii() and value.isprintable() and " " not in value:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return "~" + base64.urlsafe_b64encode(digest)[:22].decode()


class Envelope(msgspec.Struct, kw_only=True):
    """Metadata of one message."""

    id: str
    contract: str
    version: int
    conversation_id: str
    causation_id: str | None = None
    sender: str | None = None
    sent_at_ns: int = 0
    traceparent: str | None = None
    tracestate: str | None = None
    llm: str | None = None

    @classmethod
    def new(
        cls,
        contract: str,
        version: int,
        *,
        sender: str | None = None,
        cause: Envelope | None = None,
        conversation_id: str | None = None,
        msg_id: str | None = None,
    ) -> Envelope:
        """A fresh envelope; with a cause, it joins the cause's conversation.

        ``msg_id`` is for a publisher that must repeat an id (a retry, a redelivered handler).
        ``msg_id`` and ``conversation_id`` are bounded like ids read from the wire (see the module doc).
        """
        msg_id = bounded_id(msg_id) if msg_id else new_id()
        if cause is not None:
            conversation = cause.conversation_id
            causation: str | None = cause.id
        else:
            conversation = bounded_id(conversation_id) if conversation_id else msg_id
            causation = None
        return cls(
            id=msg_id,
            contract=contract,
            version=version,
            conversation_id=conversation,
            causation_id=causation,
            sender=sender,
            sent_at_ns=time.time_ns(),
        )

    def to_headers(self) -> dict[str, str]:
        headers = {
            MSG_ID: self.id,
            CONTRACT: self.contract,
            VERSION: str(self.version),
            CONVERSATION_ID: self.conversation_id,
            SENT_AT: str(self.sent_at_ns),
        }
        if self.causation_id is not None:
            headers[CAUSATION_ID] = self.causation_id
        if self.sender is not None:
            headers[SENDER] = self.sender
        if self.traceparent is not None:
            headers[TRACEPARENT] = self.traceparent
        if self.tracestate is not None:
            headers[TRACESTATE] = self.tracestate
        if self.llm is not None:
            headers[LLM] = self.llm
        return headers

    @classmethod
    def from_headers(cls, headers: dict[str, str] | None, *, contract: str = "", version: int = 0) -> Envelope:
        """Read an envelope; a message from a plain NATS client (no headers) gets a fresh id.

        Ids are bounded (see the module doc): they are copied into every message this one causes.
        """
        if not headers:
            msg_id = new_id()
            return cls(id=msg_id, contract=contract, version=version, conversation_id=msg_id)
        get = headers.get
        sent_id = get(MSG_ID)
        msg_id = bounded_id(sent_id) if sent_id else new_id()
        conversation = get(CONVERSATION_ID)
        causation = get(CAUSATION_ID)
        return cls(
            id=msg_id,
            contract=get(CONTRACT, contract),
            version=_int(get(VERSION), version),
            conversation_id=bounded_id(conversation) if conversation else msg_id,
            causation_id=bounded_id(causation) if causation else None,
            sender=get(SENDER),
            sent_at_ns=_int(get(SENT_AT), 0),
            traceparent=get(TRACEPARENT),
            tracestate=get(TRACESTATE),
            llm=get(LLM),
        )

    @property
    def age_seconds(self) -> float:
        """Seconds since the message was sent (0 when the sender gave no time)."""
        return (time.time_ns() - self.sent_at_ns) / 1e9 if self.sent_at_ns else 0.0

    def as_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


def _int(value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return default
