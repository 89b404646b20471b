"""Durable delivery: JetStream streams from contract declarations and durable pull consumers.

A contract declared ``durable=True`` (or a subscription ``@on(C, durable=True)``) travels on a
JetStream stream named after it, created or updated from its :class:`~busagents.Durability`.
Each agent type gets one durable pull consumer per stream, named after the agent and shared
by all its replicas (the JetStream form of the queue group). The worker acknowledges a message
only after the handler returned *and* its durable outputs were stored (publish acks), so a
crash at any point means redelivery, never loss; outputs carry ids derived from the input's
id, so a redelivered handler republishes the same ids and JetStream drops the copies.

Per-key ordering (``Durability(ordered_partitions=N)``): the stream's subject transform
rewrites ``<subject>.<key>`` to ``<subject>.<partition(key)>.<key>``; each partition gets its
own consumer with ``max_ack_pending=1``. A key always lands in the same partition and a
partition has at most one unacknowledged message across *all* replicas, so messages of one
key are handled in order even when a replica dies mid-message (the redelivery comes before
anything newer). We chose this over a consumer per key (unbounded consumers) and over
client-side sharding (needs replica membership and rebalancing): it needs no coordination,
and parallelism is bounded by the number of partitions, not the number of keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from ._natspy import buffered, pending_queue, taken
from .contract import ContractInfo, Durability
from .errors import ConfigError

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = [
    "DurableConsumer",
    "consumer_config",
    "consumer_names",
    "create_or_update_stream",
    "delivery_count",
    "derived_id",
    "ensure_stream",
    "jetstream_permissions",
    "partition_filters",
    "stream_config",
    "stream_name",
    "stream_sequence",
    "unpartitioned",
]

log = logging.getLogger("busagents.durable")

_MOVED_TO_DLQ = frozenset({"DLQ_STREAM", "DLQ_SUBJECTS", "dlq_permissions", "ensure_dlq_stream"})

_ACK = b"+ACK"
_PROGRESS = b"+WPI"
_TERM = b"+TERM"
_PENDING_MSGS = "Nats-Pending-Messages"
_STATUS = "Status"
_HEARTBEAT = "100"


def __getattr__(name: str) -> Any:
    """The dead-letter stream moved to :mod:`busagents.dlq`; older imports from here still work."""
    if name in _MOVED_TO_DLQ:
        from . import dlq  # not at the top: dlq builds on this module

        return getattr(dlq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Streams


def stream_name(info: ContractInfo, durability: Durability) -> str:
    """The stream of a durable contract: ``durability.stream`` or ``BA_<contract name>``."""
    return durability.stream or f"BA_{info.name}"


def stream_config(info: ContractInfo, d: Durability) -> api.StreamConfig:
    """The JetStream configuration a contract's declaration asks for."""
    transform = None
    if d.ordered_partitions:
        transform = api.SubjectTransform(
            src=f"{info.subject}.*",
            dest=f"{info.subject}.{{{{partition({d.ordered_partitions},1)}}}}.{{{{wildcard(1)}}}}",
        )
    return api.StreamConfig(
        name=stream_name(info, d),
        description=f"busagents: {info.kind.value} {info.name} v{info.version}",
        subjects=[info.subscribe_subject],
        retention=api.RetentionPolicy(d.retention),
        max_age=d.max_age,
        max_msgs=d.max_msgs,
        num_replicas=d.replicas,
        storage=api.StorageType(d.storage),
        duplicate_window=d.duplicate_window,
        subject_transform=transform,
    )


async def ensure_stream(js: JetStreamContext, info: ContractInfo, d: Durability) -> str:
    """Create the contract's stream, or update it to the declaration; returns its name."""
    return await create_or_update_stream(js, stream_config(info, d))


async def create_or_update_stream(js: JetStreamContext, config: api.StreamConfig) -> str:
    """Create the stream ``config`` describes, or update it to ``config``; returns its name."""
    assert config.name is not None
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use with a different configuration
            raise ConfigError(f"cannot create stream {config.name} for {config.subjects}: {exc.description}") from None
        try:
            await js.update_stream(config)
        except nats.js.errors.APIError as upd:
            raise ConfigError(
                f"stream {config.name} exists with another configuration that cannot be updated to the "
                f"declared one ({upd.description}); delete it or change the declaration"
            ) from None
    return config.name


def jetstream_permissions(info: ContractInfo, d: Durability, *, consumer: str | None) -> tuple[set[str], set[str]]:
    """NATS (publish, subscribe) permissions for a durable contract, as publisher or as ``consumer``.

    Besides these, the connection needs a subscription on its own inbox (publish acks, API
    replies, pulled messages) and the dead-letter permissions (:func:`busagents.dlq.dlq_permissions`).
    """
    stream = stream_name(info, d)
    pub = {f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"}  # ensure_stream
    sub: set[str] = set()
    if consumer is not None:
        names = consumer_names(consumer, d)
        pub.add(f"$JS.API.STREAM.MSG.GET.{stream}")  # the message of a max-deliveries advisory
        for name in names:
            pub |= {
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",  # <name>.<filter subject>
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                f"$JS.ACK.{stream}.{name}.>",  # ack, nak, in-progress, term
                f"$JS.ACK.*.*.{stream}.{name}.>",  # the same, v2 ack subjects
            }
            sub.add(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{name}")
    return pub, sub


# Consumers


def consumer_names(agent: str, d: Durability) -> list[str]:
    """The durable consumers an agent's replicas share on a contract's stream: ``<agent>``, or
    ``<agent>-p<i>`` for each partition of an ordered contract."""
    return [f"{agent}-p{p}" for p in range(d.ordered_partitions)] if d.ordered_partitions else [agent]


def consumer_config(
    name: str, filter_subject: str, d: Durability, *, max_ack_pending: int | None = None
) -> api.ConsumerConfig:
    """A durable pull consumer with explicit acks, named ``name``, shared by every replica."""
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=d.ack_wait,
        max_deliver=d.max_deliver,
        filter_subject=filter_subject,
        max_ack_pending=max_ack_pending or d.max_ack_pending,
        max_waiting=512,
    )


def partition_filters(info: ContractInfo, d: Durability) -> list[str]:
    """Filter subject of each partition of an ordered contract."""
    return [f"{info.subject}.{p}.*" for p in range(d.ordered_partitions)]


def unpartitioned(base: str) -> Callable[[str], str]:
    """Maps a stored ``<base>.<partition>.<key>`` subject back to the published ``<base>.<key>``."""
    cut = len(base) + 1

    def strip(subject: str) -> str:
        rest = subject[cut:]
        return f"{base}.{rest[rest.find('.') + 1 :]}"

    return strip


# Message ids and acks


def derived_id(cause_id: str, sender: str, n: int) -> str:
    """The id of the ``n``-th message ``sender`` publishes while handling ``cause_id``.

    Deterministic, so a redelivered handler republishes the same ids and JetStream's
    duplicate window (and downstream idempotency) drops the second copies.
    """
    digest = hashlib.blake2b(f"{cause_id}/{sender}/{n}".encode(), digest_size=16).digest()
    return base64.urlsafe_b64encode(digest)[:22].decode()


def delivery_count(reply: str) -> int:
    """How many times JetStream delivered this message (from its ``$JS.ACK`` reply subject)."""
    tokens = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>... with a trailing token
    index = 4 if len(tokens) == 9 else 6
    try:
        return int(tokens[index])
    except (IndexError, ValueError):
        return 1


def stream_sequence(reply: str) -> tuple[str, int]:
    """The stream and stream sequence of a delivered message: its identity across redeliveries."""
    tokens = reply.split(".")
    base = 2 if len(tokens) == 9 else 4
    try:
        return tokens[base], int(tokens[base + 3])
    except (IndexError, ValueError):
        return "", 0


def backoff_delay(d: Durability, delivered: int) -> float:
    if not d.backoff:
        return 0.0
    return d.backoff[min(delivered, len(d.backoff)) - 1]


async def ack(nc: Any, msg: Msg) -> None:
    await nc.publish(msg.reply, _ACK)


async def nak(nc: Any, msg: Msg, delay: float) -> None:
    payload = b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode() if delay > 0 else b"-NAK"
    await nc.publish(msg.reply, payload)


async def term(nc: Any, msg: Msg) -> None:
    await nc.publish(msg.reply, _TERM)


class DurableConsumer:
    """One replica's share of a durable pull consumer: pulls in batches, handles with ``lanes`` tasks.

    The loop is the "consume" pattern of the NATS clients, kept lean: one inbox subscription,
    lanes reading nats-py's pending queue directly (no task or queue hop per message), and a
    new pull request only when the messages asked for but not yet handled fall under half a
    batch. Everything this replica holds (in a lane or buffered) gets an in-progress ack every
    ``ack_wait / 3`` seconds, so a long handler (an LLM call) keeps its message and nothing
    buffered behind it is redelivered to another replica. ``handle`` settles each message
    (ack, nak or term); an exception escaping it leaves the message to be redelivered.
    """

    def __init__(
        self,
        nc: Any,
        stream: str,
        consumer: str,
        handle: Callable[[Msg], Awaitable[None]],
        *,
        lanes: int,
        batch: int,
        ack_wait: float,
        expires: float = 30.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self._handle = handle
        self._lanes = lanes
        self._batch = max(batch, 1)
        self._low = self._batch // 2
        self._ack_wait = ack_wait
        self._expires = expires
        self._heartbeat = min(1.0, expires / 6)
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._outstanding = 0  # asked for and not yet handled (on the way, buffered or in a lane)
        self._current: list[str | None] = [None] * lanes  # ack subject of the message in each lane
        self._busy = 0
        self._draining = False
        self._last_seen = 0.0
        self._sub: Subscription | None = None
        self._inbox = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._returned: list[Msg] = []  # taken off the queue while draining, not started: nak'd by stop()

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(
            self._inbox, pending_msgs_limit=max(4 * self._batch, 1024), pending_bytes_limit=256 * 1024 * 1024
        )
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        self._tasks = [
            asyncio.create_task(self._lane(i), name=f"durable:{self.consumer}:{i}") for i in range(self._lanes)
        ]
        self._tasks.append(asyncio.create_task(self._keeper(), name=f"durable:{self.consumer}:keeper"))
        await self._pull()

    async def _pull(self) -> None:
        want = self._batch - self._outstanding
        if want <= 0 or self._draining:
            return
        self._outstanding += want
        request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            want,
            int(self._expires * 1e9),
            int(self._heartbeat * 1e9),
        )
        try:
            await self.nc.publish(self._next, request, reply=self._inbox)
        except nats.errors.Error as exc:  # closed or reconnecting: the keeper asks again
            self._outstanding -= want
            log.debug("pull request on %s failed: %r", self._next, exc)

    async def _lane(self, index: int) -> None:
        assert self._sub is not None
        sub = self._sub
        queue = pending_queue(sub)
        handle = self._handle
        current = self._current
        loop = asyncio.get_running_loop()
        while True:
            msg = await queue.get()
            taken(sub, msg)
            self._last_seen = loop.time()
            reply = msg.reply
            if not reply:
                self._on_status(msg)
                queue.task_done()
                if self._outstanding <= self._low:
                    await self._pull()
                continue
            if self._draining:  # not started: given back by stop(), once our own pull can no longer take it
                self._returned.append(msg)
                self._outstanding -= 1
                queue.task_done()
                continue
            current[index] = reply
            self._busy += 1
            try:
                await handle(msg)
            except Exception:
                log.exception(
                    "unsettled message on %s (consumer %s); it will be redelivered", msg.subject, self.consumer
                )
            finally:
                current[index] = None
                self._busy -= 1
                queue.task_done()
            self._outstanding -= 1
            if self._draining:
                if self._busy == 0:
                    self._idle.set()
            elif self._outstanding <= self._low:
                await self._pull()

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get(_STATUS)
        if status == _HEARTBEAT:
            return
        pending = headers.get(_PENDING_MSGS)
        if pending is not None:  # 408 request expired / 409: that many will not come
            self._outstanding = max(self._outstanding - int(pending), self._held())
        elif status in ("404", "408", "409"):
            self._outstanding = self._held()
        if status not in ("404", "408"):
            log.info("consumer %s: status %s %s", self.consumer, status, headers.get("Description", ""))

    def _held(self) -> int:
        """Messages in this replica: buffered plus in a lane."""
        return (self._sub.pending_msgs if self._sub is not None else 0) + self._busy

    async def _keeper(self) -> None:
        """Sends in-progress acks for what this replica holds; asks again when pulls went silent."""
        loop = asyncio.get_running_loop()
        tick = min(self._ack_wait / 4, self._heartbeat)
        progress_every = self._ack_wait / 3 - tick / 2  # a tick late is still in time
        last_progress = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            try:
                if now - last_progress >= progress_every:
                    last_progress = now
                    await self._progress()
                waiting = self._outstanding - self._held()
                if not self._draining and waiting > 0 and now - self._last_seen > 3 * self._heartbeat:
                    # no message nor heartbeat: the server lost our pull (restart, leader change)
                    log.info("consumer %s: pull went silent; asking again", self.consumer)
                    self._outstanding = self._held()
                    self._last_seen = now
                    await self._pull()
                elif not self._draining and self._outstanding <= self._low:
                    await self._pull()
            except nats.errors.Error as exc:
                log.debug("consumer %s keeper: %r", self.consumer, exc)

    async def _progress(self) -> None:
        publish = self.nc.publish
        for reply in self._current:
            if reply:
                await publish(reply, _PROGRESS)
        if self._sub is not None:
            for msg in buffered(self._sub):
                if msg.reply:
                    await publish(msg.reply, _PROGRESS)

    async def reconnected(self) -> None:
        """After a reconnect the server may have forgotten our pull requests: ask again."""
        self._outstanding = self._held()
        self._last_seen = asyncio.get_running_loop().time()
        with contextlib.suppress(nats.errors.Error):
            await self._pull()

    async def drain(self, timeout: float) -> bool:
        """Stop pulling, give back what was not started, finish what is in a lane. False on timeout."""
        self._draining = True
        if self._busy:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                log.warning("drain of consumer %s timed out with %d message(s) in flight", self.consumer, self._busy)
                await self.stop()
                return False
        # what the server sent before this round trip is in our buffer after it: stop() hands it all back,
        # instead of leaving messages still on the wire to wait out the ack wait
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.nc.flush(timeout=2)
        await self.stop()
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._sub is not None:
            # messages buffered but not started: hand them back before we go, after the inbox is gone, so
            # that the server redelivers them to another replica's pull, not to this replica's pending one
            # (the server drops a waiting pull whose inbox has no interest any more)
            unstarted = [msg for msg in [*self._returned, *buffered(self._sub)] if msg.reply]
            self._returned = []
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
            for msg in unstarted:
                with contextlib.suppress(nats.errors.Error):
                    await nak(self.nc, msg, 0)
