"""Replaying a conversation: its recorded messages, published again beside production.

The messages of one conversation are read from JetStream as ``busagents trace`` reads them
(:func:`busagents.conversation.read_conversation`: the durable contracts' streams, and the
conversation log when it is on) and published again, byte for byte with their headers, on a
bus with a subject prefix (``replay.<id>.``: agents run with the same prefix consume them,
production agents never see them) or on another server. A durable message is stored in its
contract's stream of that namespace. Query requests are not replayed (the replayed agent asks
again), nor dead letters, nor messages of other namespaces or of dry runs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .contract import ContractInfo, Kind
from .conversation import read_conversation
from .convlog import CONVERSATION_LOG_STREAM
from .dlq import stored_headers
from .durable import stream_name, unpartitioned
from .errors import ConfigError
from .observe import Catalog, Seen

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["Replayed", "default_namespace", "replay_conversation", "subject_matcher"]

Speed = Literal["original", "fast"]


@dataclass(frozen=True, slots=True)
class Replayed:
    """One message published again: where it went, and after how long (seconds from the first)."""

    subject: str
    contract: str
    id: str | None
    at: float


def default_namespace(conversation_id: str) -> str:
    """``replay.<conversation id>.``, the id reduced to what a subject token may hold."""
    return f"replay.{re.sub(r'[^A-Za-z0-9_-]', '_', conversation_id)}."


def subject_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """Whether a subject matches one of the NATS subject ``patterns`` (``*`` a token, ``>`` the rest)."""
    compiled = []
    for pattern in patterns:
        tokens = ["[^.]+" if t == "*" else ".+" if t == ">" else re.escape(t) for t in pattern.split(".")]
        compiled.append(re.compile(r"\.".join(tokens)))
    if not compiled:
        return lambda subject: True
    return lambda subject: any(p.fullmatch(subject) for p in compiled)


async def replay_conversation(
    source: Bus,
    conversation_id: str,
    target: Bus,
    catalog: Catalog,
    *,
    since: float | None = None,
    until: float | None = None,
    subjects: Iterable[str] = (),
    speed: Speed = "fast",
) -> list[Replayed]:
    """Publish the conversation's kept messages again on ``target`` (under its prefix); returns them."""
    if target.nc is source.nc and not target.prefix:
        raise ConfigError("replaying on the source's own subjects would act again: give a prefix or another server")
    matches = subject_matcher(subjects)
    chosen: list[tuple[Seen, ContractInfo, str]] = []
    for seen in await read_conversation(source, conversation_id, catalog):
        picked = _replayable(seen, catalog)
        if picked is None:
            continue
        info, subject = picked
        when = seen.time or 0.0
        if (since is not None and when < since) or (until is not None and when > until) or not matches(subject):
            continue
        chosen.append((seen, info, subject))
    done: list[Replayed] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = chosen[0][0].time or 0.0 if chosen else 0.0
    for seen, info, subject in chosen:
        offset = (seen.time or first) - first
        if speed == "original":
            await asyncio.sleep(max(0.0, offset - (loop.time() - started)))  # the recorded pace
        assert seen.stream is not None and seen.seq is not None
        raw = await source.js.get_msg(seen.stream, seq=seen.seq)
        await _publish(target, info, subject, raw.data or b"", stored_headers(raw))
        done.append(Replayed(target.subject(subject), info.name, seen.id, round(offset, 6)))
    await target.flush()
    return done


def _replayable(seen: Seen, catalog: Catalog) -> tuple[ContractInfo, str] | None:
    """The contract and published subject of a message worth replaying, or None."""
    info = catalog.by_name.get(seen.contract or "")
    if info is None or seen.dead_letter is not None or seen.stream is None or info.kind is Kind.QUERY:
        return None
    if info.durability is None:  # a core message: only as the conversation log keeps it
        return (info, seen.subject) if seen.stream == CONVERSATION_LOG_STREAM else None
    if seen.stream != stream_name(info, info.durability):
        return None  # another namespace's copy, or a record
    if info.durability.ordered_partitions:  # stored as <subject>.<partition>.<key>
        return info, unpartitioned(info.subject)(seen.subject)
    return info, seen.subject


async def _publish(target: Bus, info: ContractInfo, subject: str, data: bytes, headers: dict[str, str]) -> None:
    if info.durable:
        await target.publish_durable(info, target.subject(subject), data, headers)
    else:
        await target.nc.publish(target.subject(subject), data, headers=headers)
