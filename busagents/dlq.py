"""Dead letters kept in the ``BUSAGENTS_DLQ`` stream: read them, replay them.

Every dead letter (``busagents.dlq.<agent>``) carries the original bytes and headers plus
``Ba-Dlq-Reason/-Stage/-Subject/-Agent`` (see :mod:`busagents.worker`). A replay publishes
the original message again on its original subject with:

* a new ``Nats-Msg-Id`` (``<original id>.replay.<dlq seq>``): the original id may still be in
  the stream's duplicate window, where JetStream would silently drop the replay; the id is
  fixed per dead letter, so replaying the same dead letter twice within the window lands once;
* ``Ba-Replay-Of: <original id>``: handlers see it as ``ctx.message_id``, so an idempotent
  handler still recognises an effect that did happen before the message died.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import nats.js.errors

from .bus import Bus
from .durable import DLQ_STREAM
from .envelope import MSG_ID, REPLAY_OF
from .errors import ConfigError
from .worker import DLQ_AGENT, DLQ_DELIVERIES, DLQ_MSG_ID, DLQ_PREFIX, DLQ_REASON, DLQ_STAGE, DLQ_SUBJECT

__all__ = ["DeadLetter", "dead_letters", "get_dead_letter", "replay_dead_letter"]


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
    headers: dict[str, str]
    data: bytes

    def replay_headers(self) -> dict[str, str]:
        """The original headers, without the dead-letter ones, with a replay id (see module doc)."""
        headers = {k: v for k, v in self.headers.items() if not k.startswith("Ba-Dlq-")}
        root = self.headers.get(REPLAY_OF) or self.original_id
        if root:
            headers[REPLAY_OF] = root
        headers[MSG_ID] = f"{root or 'dlq'}.replay.{self.seq}"
        return headers


async def get_dead_letter(bus: Bus, seq: int) -> DeadLetter:
    """The dead letter stored at ``seq``; ConfigError when there is none."""
    try:
        raw = await bus.js.get_msg(DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        raise ConfigError(f"no dead letter #{seq} in {DLQ_STREAM}") from None
    return _dead_letter(raw.seq or seq, raw.time, raw.subject or "", raw.headers or {}, raw.data or b"")


async def dead_letters(bus: Bus, *, agent: str | None = None, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters still kept (of one agent, or all)."""
    try:
        info = await bus.js.stream_info(DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        return []
    subject = f"{DLQ_PREFIX}.{agent}" if agent else f"{DLQ_PREFIX}.>"
    found: list[DeadLetter] = []
    seq = info.state.first_seq
    while len(found) < limit and seq <= info.state.last_seq:
        try:
            raw = await bus.js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        assert raw.seq is not None
        found.append(_dead_letter(raw.seq, raw.time, raw.subject or "", raw.headers or {}, raw.data or b""))
        seq = raw.seq + 1
    return found


async def replay_dead_letter(bus: Bus, letter: DeadLetter, *, delete: bool = False) -> str:
    """Publish the original message again on its subject; with ``delete``, drop the dead letter after.

    Stored with a JetStream ack when a stream captures the subject, else sent on core NATS.
    Returns the replay's message id.
    """
    if not letter.subject:
        raise ConfigError(f"dead letter #{letter.seq} has no {DLQ_SUBJECT} header: cannot tell where to replay it")
    headers = letter.replay_headers()
    try:
        await bus.js.publish(letter.subject, letter.data, timeout=5.0, headers=headers)
    except nats.js.errors.NoStreamResponseError:
        await bus.nc.publish(letter.subject, letter.data, headers=headers)
        await bus.flush()
    if delete:
        await bus.js.delete_msg(DLQ_STREAM, letter.seq)
    return headers[MSG_ID]


def _dead_letter(
    seq: int, time: datetime.datetime | None, subject: str, headers: dict[str, str], data: bytes
) -> DeadLetter:
    deliveries = headers.get(DLQ_DELIVERIES)
    return DeadLetter(
        seq=seq,
        time=time,
        agent=headers.get(DLQ_AGENT) or subject.removeprefix(DLQ_PREFIX + "."),
        stage=headers.get(DLQ_STAGE, ""),
        reason=headers.get(DLQ_REASON, ""),
        subject=headers.get(DLQ_SUBJECT, ""),
        original_id=headers.get(DLQ_MSG_ID) or headers.get(MSG_ID),
        deliveries=int(deliveries) if deliveries and deliveries.isdigit() else None,
        headers=dict(headers),
        data=data,
    )
