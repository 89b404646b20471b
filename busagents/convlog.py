"""The conversation log: a bounded JetStream stream that keeps core-NATS messages for ``busagents trace``.

Durable contracts are kept by their own streams and dead letters by ``BUSAGENTS_DLQ``; the
messages of core contracts (events, commands and query requests on core NATS) are gone once
delivered. Turned on (``BUSAGENTS_CONVERSATION_LOG=1``, which ``busagents run`` and the agents
``swarm up`` starts read, or ``busagents demo --conversation-log``), each worker adds the core
subjects its agents consume and produce to the ``BUSAGENTS_CONVERSATIONS`` stream. The stream
is bounded (``BUSAGENTS_CONVERSATION_LOG_MAX_AGE`` seconds, ``..._MAX_BYTES``; oldest dropped
first) and sends no acks (``no_ack``), so a query's requester still gets the agent's answer,
not the stream's. Off by default: it costs a stored copy of every core message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js import api

from .agent import Agent
from .contract import contract_info
from .errors import ConfigError
from .subjects import is_reserved

if TYPE_CHECKING:
    from .bus import Bus
    from .settings import Settings

__all__ = [
    "CONVERSATION_LOG_STREAM",
    "ConversationLog",
    "conversation_log",
    "core_subjects",
    "ensure_conversation_log",
]

log = logging.getLogger("busagents.convlog")

CONVERSATION_LOG_STREAM = "BUSAGENTS_CONVERSATIONS"
_OVERLAP = 10065  # JetStream: subjects overlap with an existing stream
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class ConversationLog:
    """The log's bounds: what is older than ``max_age`` seconds, or beyond ``max_bytes``, is dropped."""

    max_age: float = 3600.0
    max_bytes: int = 256 * 1024 * 1024


def core_subjects(agents: Iterable[Agent]) -> set[str]:
    """The subjects of the core (not durable) contracts the agents consume or produce."""
    out: set[str] = set()
    for agent in agents:
        for handler in type(agent).handlers.values():
            if handler.durability is None and not is_reserved(handler.contract.subject):
                out.add(handler.contract.subscribe_subject)
        for contract in (*type(agent).produces, *type(agent).awaits):
            info = contract_info(contract)
            if info.durability is None and not is_reserved(info.subject):
                out.add(info.subscribe_subject)
    return out


async def ensure_conversation_log(bus: Bus, agents: Iterable[Agent], bounds: ConversationLog) -> set[str]:
    """Make the log keep the core subjects of ``agents`` (added to those it keeps); returns what it keeps.

    Workers started at the same time each add their subjects: the stream is read, extended and
    updated until it holds ours. A subject another stream already captures is left out with a warning.
    """
    wanted = core_subjects(agents)
    if not wanted:
        return set()
    skipped: set[str] = set()
    for _ in range(_ATTEMPTS):
        kept = await _subjects(bus)
        missing = wanted - kept - skipped
        if not missing:
            return kept
        try:
            await _store(bus, sorted(kept | missing), bounds, create=not kept)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _OVERLAP:
                raise ConfigError(f"cannot keep the conversation log: {exc.description}") from None
            skipped |= await _overlapping(bus, kept, missing, bounds)
    kept = await _subjects(bus)
    if wanted - kept - skipped:
        raise ConfigError(
            f"the conversation log does not keep {sorted(wanted - kept - skipped)} after {_ATTEMPTS} tries"
        )
    return kept


async def _subjects(bus: Bus) -> set[str]:
    try:
        info = await bus.js.stream_info(CONVERSATION_LOG_STREAM)
    except nats.js.errors.NotFoundError:
        return set()
    return set(info.config.subjects or [])


async def _store(bus: Bus, subjects: list[str], bounds: ConversationLog, *, create: bool) -> None:
    config = api.StreamConfig(
        name=CONVERSATION_LOG_STREAM,
        description="busagents: the conversation log (core messages, for busagents trace)",
        subjects=subjects,
        retention=api.RetentionPolicy.LIMITS,
        max_age=bounds.max_age,
        max_bytes=bounds.max_bytes,
        discard=api.DiscardPolicy.OLD,
        storage=api.StorageType.FILE,
        num_replicas=bus.replicas or 1,
        no_ack=True,
    )
    if create:
        try:
            await bus.js.add_stream(config)
            return
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # created meanwhile by another worker: update it
                raise
    await bus.js.update_stream(config)


async def _overlapping(bus: Bus, kept: set[str], missing: set[str], bounds: ConversationLog) -> set[str]:
    """Add the missing subjects one by one; return those another stream captures already."""
    skipped = set()
    for subject in sorted(missing):
        try:
            await _store(bus, sorted(kept | {subject}), bounds, create=not kept)
            kept = kept | {subject}
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != _OVERLAP:
                raise ConfigError(f"cannot keep the conversation log: {exc.description}") from None
            log.warning("the conversation log leaves out %s: another stream captures it (%s)", subject, exc.description)
            skipped.add(subject)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise ConfigError(f"cannot keep the conversation log: {exc!r}") from None
    return skipped


def conversation_log(settings: Settings) -> ConversationLog | None:
    """The log ``BUSAGENTS_CONVERSATION_LOG*`` ask for, or None when it is off."""
    if not settings.conversation_log:
        return None
    return ConversationLog(settings.conversation_log_max_age, settings.conversation_log_max_bytes)
