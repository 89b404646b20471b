"""Dry runs: an agent's handlers run, but what they send is recorded instead of published.

A bus in dry-run mode (``Bus(dry_run=True)``, ``busagents run NAME --dry-run`` or
``--shadow``, ``BUSAGENTS_DRY_RUN=1``) stores every message its agents publish, and every
answer to a query, in the ``BUSAGENTS_DRYRUN`` stream on ``busagents.dryrun.<agent>``, with
the envelope it would have travelled with and its subject in ``Ba-Dry-Subject``: nothing
reaches a production subject. Requests still go out (asking is not acting), and key-value
state goes to buckets of its own (``dryrun_<bucket>``). ``busagents shadow report`` reads
the records (:mod:`busagents.shadow`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js import api

from .durable import create_or_update_stream
from .envelope import SENDER
from .errors import ConfigError
from .observe import Catalog, Seen
from .subjects import DRYRUN_PREFIX

if TYPE_CHECKING:
    from .bus import Bus

__all__ = [
    "DRYRUN_PREFIX",
    "DRYRUN_STREAM",
    "DRY_SUBJECT",
    "Recorded",
    "ensure_dryrun_stream",
    "read_records",
    "record",
    "record_subject",
]

DRYRUN_STREAM = "BUSAGENTS_DRYRUN"
#: The subject a recorded message would have been published on.
DRY_SUBJECT = "Ba-Dry-Subject"
#: What a dry run keeps a record: a week (a shadow's records are compared after the day).
_MAX_AGE = 7 * 24 * 3600.0


def record_subject(agent: str) -> str:
    return f"{DRYRUN_PREFIX}.{agent}"


async def ensure_dryrun_stream(bus: Bus) -> None:
    """Create the stream that keeps the records (in the bus's namespace); a dry run needs JetStream."""
    config = api.StreamConfig(
        name=bus.stream_name(DRYRUN_STREAM),
        description="busagents: what agents in dry-run mode would have sent",
        subjects=[bus.subject(f"{DRYRUN_PREFIX}.>")],
        storage=api.StorageType.FILE,
        max_age=_MAX_AGE,
        num_replicas=bus.replicas or 1,
    )
    try:
        await create_or_update_stream(bus.js, config)
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
        raise ConfigError(
            f"a dry run records what it would send in the JetStream stream {config.name}, "
            f"but the NATS server at {bus.url} has no JetStream: start it with JetStream (nats-server -js)"
        ) from None


async def record(bus: Bus, subject: str, payload: bytes, headers: dict[str, str]) -> None:
    """Keep what would have been sent on ``subject`` (stored with an ack) instead of sending it."""
    agent = headers.get(SENDER) or "unknown"
    kept = {**headers, DRY_SUBJECT: subject}
    kept.pop("Nats-Msg-Id", None)  # a record is not the message: JetStream must not drop it as a duplicate
    target = bus.subject(record_subject(agent))
    try:
        await bus.js.publish(target, payload, headers=kept, timeout=5.0)
    except nats.js.errors.NoStreamResponseError:
        await ensure_dryrun_stream(bus)
        await bus.js.publish(target, payload, headers=kept, timeout=5.0)


@dataclass(slots=True)
class Recorded:
    """One recorded output: the message as it would have been seen, and its intended subject."""

    seen: Seen
    subject: str


async def read_records(bus: Bus, catalog: Catalog, agent: str | None = None) -> list[Recorded]:
    """Every record of ``agent`` (every agent: None), oldest first."""
    stream = bus.stream_name(DRYRUN_STREAM)
    try:
        await bus.js.stream_info(stream)
    except (nats.js.errors.NotFoundError, nats.errors.NoRespondersError):
        return []
    subject = bus.subject(record_subject(agent) if agent else f"{DRYRUN_PREFIX}.>")
    sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    out: list[Recorded] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                break
            headers = msg.headers or {}
            seen = catalog.read(headers.get(DRY_SUBJECT, msg.subject), headers, msg.data, received=time.time())
            out.append(Recorded(seen, headers.get(DRY_SUBJECT, "")))
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out
