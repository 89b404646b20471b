"""One conversation as JetStream keeps it, as a causal tree: for ``busagents trace``.

Its messages are found in every stream that keeps messages (the durable contracts' streams,
the dead letters, the conversation log of :mod:`busagents.convlog`; not KV or object
buckets) by their ``Ba-Conversation-Id`` header: each stream is read headers-only by an
ephemeral consumer, and only the matches are fetched whole. Each message hangs under the
message that caused it (``Ba-Causation-Id``), a dead letter under the message it gave up on.
A message whose cause is not kept (a core message without the log, or aged out) is a root,
marked so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api

from .dlq import stored_headers
from .envelope import CONVERSATION_ID
from .observe import Catalog, Seen

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["Hop", "causal_tree", "read_conversation", "scan_streams"]

_NOT_MESSAGES = ("KV_", "OBJ_")  # key-value and object buckets
_BATCH = 1000


@dataclass(slots=True)
class Hop:
    """One message of the conversation and what it caused."""

    seen: Seen
    children: list[Hop] = field(default_factory=list)
    #: The message names a cause that is not kept (a core message without the log, or aged out).
    orphan: bool = False

    def walk(self, depth: int = 0) -> Iterator[tuple[int, Hop]]:
        yield depth, self
        for child in self.children:
            yield from child.walk(depth + 1)

    def as_dict(self, parent: Seen | None = None) -> dict[str, Any]:
        out = self.seen.as_dict()
        out["after_seconds"] = _after(parent, self.seen)
        out["cause_not_kept"] = self.orphan
        out["caused"] = [child.as_dict(self.seen) for child in self.children]
        return out


async def read_conversation(bus: Bus, conversation_id: str, catalog: Catalog) -> list[Seen]:
    """Every kept message of the conversation, oldest first."""
    found = await scan_streams(bus, catalog, lambda headers: headers.get(CONVERSATION_ID) == conversation_id)
    unique = {(s.stream, s.seq): s for s in found}
    return sorted(unique.values(), key=lambda s: (s.time or 0.0, s.seq or 0))


def causal_tree(messages: list[Seen]) -> list[Hop]:
    """The messages as trees of causes: roots oldest first, each hop's children oldest first."""
    hops = [Hop(m) for m in messages]
    by_id: dict[str, Hop] = {}
    for hop in hops:
        if hop.seen.id and hop.seen.dead_letter is None:
            by_id.setdefault(hop.seen.id, hop)
    roots: list[Hop] = []
    for hop in hops:
        dead = hop.seen.dead_letter
        cause = (dead.get("original_id") or hop.seen.id) if dead is not None else hop.seen.causation
        parent = by_id.get(cause) if cause else None
        if parent is not None and parent is not hop:
            parent.children.append(hop)
            continue
        hop.orphan = bool(cause) and dead is None
        roots.append(hop)
    return roots


def _after(parent: Seen | None, child: Seen) -> float | None:
    if parent is None or parent.time is None or child.time is None:
        return None
    return round(child.time - parent.time, 6)


async def _streams(bus: Bus) -> list[str]:
    names: list[str] = []
    try:
        for info in await bus.js.streams_info():
            name = info.config.name or ""
            if name and not name.startswith(_NOT_MESSAGES):
                names.append(name)
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        return []  # no JetStream: nothing is kept
    return sorted(names)


async def scan_streams(bus: Bus, catalog: Catalog, match: Callable[[dict[str, str]], bool]) -> list[Seen]:
    """Every kept message whose headers ``match``, stream by stream (not KV or object buckets)."""
    found: list[Seen] = []
    for stream in await _streams(bus):
        found += await _scan(bus, stream, match, catalog)
    return found


async def _scan(bus: Bus, stream: str, match: Callable[[dict[str, str]], bool], catalog: Catalog) -> list[Seen]:
    """The stream's messages that ``match``: headers read first, matches fetched whole."""
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return []  # deleted meanwhile
    last = info.state.last_seq
    if not info.state.messages:
        return []
    consumer = await bus.js.add_consumer(
        stream,
        api.ConsumerConfig(
            headers_only=True,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    sub = await bus.js.pull_subscribe_bind(consumer=consumer.name, stream=stream)
    matches: list[int] = []
    try:
        done = False
        while not done:
            try:
                batch = await sub.fetch(_BATCH, timeout=2.0)
            except nats.errors.TimeoutError:
                break  # nothing more within the wait: what was kept at the start has been read
            for msg in batch:
                seq = msg.metadata.sequence.stream
                if match(msg.headers or {}):
                    matches.append(seq)
                done = done or seq >= last or msg.metadata.num_pending == 0
    finally:
        await sub.unsubscribe()
        await _delete(bus, stream, consumer.name)
    return [await _fetch(bus, stream, seq, catalog) for seq in matches]


async def _fetch(bus: Bus, stream: str, seq: int, catalog: Catalog) -> Seen:
    raw = await bus.js.get_msg(stream, seq=seq)
    data = raw.data or b""
    received = raw.time.timestamp() if raw.time is not None else time.time()
    return catalog.read(raw.subject or "", stored_headers(raw), data, received=received, stream=stream, seq=seq)


async def _delete(bus: Bus, stream: str, consumer: str | None) -> None:
    if consumer:
        # it is ephemeral: should this fail, the server removes it after its inactive threshold
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            await asyncio.wait_for(bus.js.delete_consumer(stream, consumer), 5)
