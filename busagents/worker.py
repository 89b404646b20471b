"""The worker: runs agents on one bus with bounded concurrency, dead letters and drain.

Each handler of each agent gets a subscription in the queue group named after the
agent, so an event reaches every agent *type* once and the replicas of a type
share the load. A message that cannot be decoded, has the wrong contract or
version, or whose handler raises goes to ``busagents.dlq.<agent>`` with the
reason, the original headers and bytes (as much as fits: :mod:`busagents.dlq`); the agent
keeps serving.

A handler of a durable contract (or ``@on(C, durable=True)``) runs the same code on a
JetStream durable pull consumer instead (:mod:`busagents.durable`): the message is acked
after the handler and its publishes succeeded; a transient failure is nak'ed with backoff
and dead-lettered after ``max_deliver`` deliveries; a permanent one (undecodable, wrong
contract or version, :class:`~busagents.errors.PermanentError`, an undeclared publish) is
dead-lettered at once and terminated. Dead letters are kept in the ``BUSAGENTS_DLQ`` stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ._tasks import cancel_and_wait
from .agent import Agent, Handler
from .bus import ERROR_HEADER, Bus, Mailbox
from .codec import codec_for, encode, projection_decoder
from .context import Context
from .contract import ContractInfo, Durability, Kind, contract_info, upcasters
from .convlog import ConversationLog, ensure_conversation_log
from .dlq import (
    bounded_reason,
    ensure_dlq_stream,
    write_dead_letter,
    write_durable_dead_letter,
    write_max_deliveries_dead_letter,
)
from .dryrun import ensure_dryrun_stream, record
from .durable import (
    DurableConsumer,
    ack,
    backoff_delay,
    consumer_config,
    delivery_count,
    nak,
    partition_filters,
    stream_sequence,
    term,
    unpartitioned,
)
from .envelope import CONTRACT, MSG_ID, VERSION, Envelope
from .errors import ContractError, DecodeError, PermanentError, UndeclaredContractError
from .micro import AgentService
from .registry import publish_schemas, withdraw_schemas
from .subjects import stats_subject
from .view import ViewConsumer

__all__ = [
    "AgentStats",
    "Outcome",
    "Worker",
    "collect_young_less_often",
]

log = logging.getLogger("busagents.worker")
#: Messages one pull request of an ordered partition's consumer asks for (delivered one at a time).
PARTITION_PULL = 16

#: Handler exceptions that retrying cannot fix: a durable message is dead-lettered at once.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    PermanentError,
    ContractError,
    UndeclaredContractError,
    DecodeError,
)


class Outcome(enum.Enum):
    """What became of one delivered message; the handler path returns it (telemetry reports it)."""

    HANDLED = "handled"
    DEAD_LETTERED = "dead_lettered"
    RETRY = "retry"  # a durable message nak'ed after a transient failure: it comes again


#: A worker's message handler: handles one message, says what became of it.
HandleMsg = Callable[[Msg], Awaitable[Outcome]]


@dataclass(slots=True)
class AgentStats:
    """Counters of one agent in one worker."""

    agent: str
    handled: int = 0
    dead_lettered: int = 0
    published: int = 0
    in_flight: int = 0


def collect_young_less_often(threshold: int) -> None:
    """Collect Python's youngest generation every ``threshold`` net allocations of container objects
    instead of every 700 (0: leave it as it is); for a process that runs agents.

    An agent's start-up (a generated day, a replayed view) and its large messages allocate a great many
    objects that live on: with Python's default, the collector walks them again and again (building
    the flight day's 200,000-passenger view took 2.9 CPU-s with it, 2.1 with 20,000). The older
    generations keep their thresholds; ``freeze_gc`` then leaves what start-up built alone.
    """
    if threshold > 0:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(threshold, middle, old)


class Worker:
    """Runs agents in this process on one bus. Use ``async with Worker(...)`` or :meth:`serve`."""

    def __init__(
        self,
        agents: Sequence[Agent],
        bus: Bus,
        *,
        drain_timeout: float = 30.0,
        heartbeat_interval: float = 0.0,
        conversation_log: ConversationLog | None = None,
        freeze_gc: bool = False,
    ) -> None:
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ContractError(f"agent names must be unique in one worker, got {names}")
        self.agents = list(agents)
        self.bus = bus
        self.drain_timeout = drain_timeout
        self.heartbeat_interval = heartbeat_interval
        #: Keep the agents' core messages in the conversation log (:mod:`busagents.convlog`); None: off.
        self.conversation_log = conversation_log
        #: Once started, leave what start-up built (the agents' data, their views) to reference counting
        #: alone (``gc.freeze``): full collections otherwise walk it all, pausing the loop for up to a
        #: second on a large heap. For a process that runs this worker (``busagents run``, the demo).
        self.freeze_gc = freeze_gc
        self.stats = {a.name: AgentStats(a.name) for a in agents}
        #: Each agent's answers to the NATS services protocol ($SRV.PING/INFO/STATS: :mod:`busagents.micro`).
        self.services = {a.name: AgentService(a, bus) for a in agents}
        self._mailboxes: list[Mailbox] = []
        self._consumers: list[DurableConsumer] = []
        self._views: list[ViewConsumer] = []
        self._agent_views: dict[str, list[ViewConsumer]] = {a.name: [] for a in agents}
        #: Seconds the views of each agent took to replay their streams before its queries were served.
        self.view_ready_seconds: dict[str, float] = {}
        self._unlisten: list[Callable[[], None]] = []
        self._dlq_stream = False
        self._registry_keys: list[str] = []  # what this worker wrote to the contracts registry
        self._tasks: list[asyncio.Task[None]] = []
        self._on: list[Agent] = []  # agents whose on_start ran: each gets its on_stop
        self._started = False
        self._serving = False
        self._draining = False
        self._stopped = asyncio.Event()

    # Lifecycle

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``serving``, ``draining`` or ``stopped`` (what ``/healthz`` reports)."""
        if self._stopped.is_set():
            return "stopped"
        if self._draining:
            return "draining"
        if self._serving:
            return "serving"
        return "starting" if self._started else "new"

    async def start(self) -> None:
        """Start every agent, then subscribe its handlers and start its ``run`` loop.

        A start that fails half-way (an ``on_start`` raises, a stream cannot be created...)
        undoes what it did before the error propagates: it unsubscribes, cancels its tasks and
        calls ``on_stop`` of the agents already started. Nothing is left running.
        """
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.drain()
            raise

    async def _start(self) -> None:
        # Every piece is recorded (self._mailboxes, _consumers, _views, _tasks, _on) as soon as
        # it exists, before it is awaited further, so drain() can undo a start that failed.
        for agent in self.agents:
            await agent.on_start(self._root_context(agent))
            self._on.append(agent)
        if self.bus.dry_run:  # before the first record: a publish to a subject no stream keeps is lost
            await ensure_dryrun_stream(self.bus)
        await self._ensure_dlq_stream(required=any(h.durable for a in self.agents for h in type(a).handlers.values()))
        if self.conversation_log is not None:
            await ensure_conversation_log(self.bus, self.agents, self.conversation_log)
        for agent in self.agents:
            handlers = type(agent).handlers.values()
            views = [h for h in handlers if h.view]
            for handler in handlers:
                if handler.view or (views and handler.contract.kind is Kind.QUERY):
                    continue  # queries wait for the views below
                if handler.durable:
                    await self._start_durable(agent, handler)
                    continue
                await self._subscribe(agent, handler)
            if views:
                await self._start_views(agent, views)
                for handler in handlers:
                    if handler.contract.kind is Kind.QUERY:
                        await self._subscribe(agent, handler)
            if type(agent).run is not Agent.run:
                self._tasks.append(asyncio.create_task(self._run_loop(agent), name=f"run:{agent.name}"))
        for service in self.services.values():
            await service.start(self.bus.nc)
        if self.freeze_gc:
            gc.freeze()
        self._serving = True  # before the first heartbeat, which tells the world so
        if self.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        await self.bus.flush()
        # off the start-up path: serving does not wait for the registry, nor fails without it
        self._tasks.append(asyncio.create_task(self._publish_schemas(), name="contracts-registry"))
        log.info("worker started: %s", ", ".join(a.name for a in self.agents))

    async def _subscribe(self, agent: Agent, handler: Handler) -> None:
        subject = self.bus.prefix + (handler.subject or handler.contract.subscribe_subject)
        handle = self._traced(agent, handler, self._handler(agent, handler))
        self._mailboxes.append(await self.bus.mailbox(subject, handle, queue=agent.name, lanes=agent.max_concurrency))

    async def _start_views(self, agent: Agent, views: list[Handler]) -> None:
        """Replay every view's stream, then return: the agent's queries are subscribed only after this."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        consumers = []
        for handler in views:
            d = self.bus.durability(handler.contract, handler.durability)
            stream = await self.bus.ensure_stream(handler.contract, handler.durability)
            info, narrowed = self._namespaced(handler)
            if d.ordered_partitions:  # stored as <subject>.<partition>.<key>
                narrow = narrowed[len(info.subject) + 1 :] if narrowed else "*"
                filter_subject = f"{info.subject}.*.{narrow}"
            else:
                filter_subject = narrowed or info.subscribe_subject
            handle = self._traced(agent, handler, self._handler(agent, handler))
            consumer = ViewConsumer(self.bus.js, stream, filter_subject, handle, label=f"{agent.name}:{info.name}")
            self._views.append(consumer)
            await consumer.start()
            self._agent_views[agent.name].append(consumer)
            consumers.append(consumer)
        for consumer in consumers:
            await consumer.ready()
        self.view_ready_seconds[agent.name] = loop.time() - started
        log.info(
            "%s: views replayed in %.2fs (%s); serving queries",
            agent.name,
            self.view_ready_seconds[agent.name],
            ", ".join(f"{c.label} {c.handled}" for c in consumers),
        )

    async def drain(self) -> bool:
        """Stop taking new work, finish what is in flight, then stop the agents.

        Returns False when in-flight work did not finish within ``drain_timeout``.
        """
        if not self._started or self._stopped.is_set():
            return True
        self._draining = True
        for service in self.services.values():
            await service.stop()
        stopped = await cancel_and_wait(self._tasks, self.drain_timeout)
        await withdraw_schemas(self.bus, self._registry_keys)
        for unlisten in self._unlisten:
            unlisten()
        for view in self._views:
            await view.stop()
        results = await asyncio.gather(
            *(m.drain(self.drain_timeout) for m in self._mailboxes),
            *(c.drain(self.drain_timeout) for c in self._consumers),
        )
        for agent in reversed(self._on):
            try:
                await agent.on_stop(self._root_context(agent))
            except Exception:
                log.exception("agent %s failed in on_stop", agent.name)
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.bus.flush()
        if self.freeze_gc:
            gc.unfreeze()  # a process that goes on (tests, an embedding app) collects it all again
        self._stopped.set()
        log.info("worker drained")
        return stopped and all(results)

    async def serve(self, stop: asyncio.Event | None = None) -> bool:
        """Start, run until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Left installed until the loop closes: a second signal during or after the drain is harmless.
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or no signals
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        except asyncio.CancelledError:
            await self.drain()
            raise
        log.info("stop requested: draining")
        return await self.drain()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    def _traced(self, agent: Agent, handler: Handler, handle: HandleMsg) -> Callable[[Msg], Awaitable[None]]:
        """The handler as mailboxes and consumers take it (they ignore the outcome), in a span when traced
        (a view's handler: see :class:`~busagents.telemetry.Telemetry`, ``trace_views``)."""
        handle = self.services[agent.name].counted(handler, handle)
        if self.bus.telemetry is not None:
            handle = self.bus.telemetry.traced_handle(
                handle,
                agent=agent.name,
                contract=handler.contract.name,
                template=handler.contract.subscribe_subject,
                query=handler.contract.kind is Kind.QUERY,
                view=handler.view,
            )
        return cast(Callable[[Msg], Awaitable[None]], handle)

    # Durable subscriptions

    async def _ensure_dlq_stream(self, *, required: bool) -> None:
        """Keep dead letters in a stream when the server has JetStream (required by durable handlers)."""
        try:
            await ensure_dlq_stream(self.bus.js, replicas=self.bus.replicas or 1)
            self._dlq_stream = True
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            if required:
                raise
            log.debug("no dead-letter stream (JetStream unavailable?): %r", exc)

    async def _start_durable(self, agent: Agent, handler: Handler) -> None:
        d = self.bus.durability(handler.contract, handler.durability)
        js = self.bus.js
        stream = await self.bus.ensure_stream(handler.contract, handler.durability)
        info, narrowed = self._namespaced(handler)
        if d.ordered_partitions:
            narrow = narrowed[len(info.subject) + 1 :] if narrowed and narrowed != info.subject else ""
            strip = unpartitioned(info.subject)
            handle = self._traced(agent, handler, self._durable_handler(agent, handler, d, strip))
            for p, filter_subject in enumerate(partition_filters(info, d)):
                if narrow:
                    filter_subject = f"{info.subject}.{p}.{narrow}"
                name = f"{agent.name}-p{p}"
                await js.add_consumer(stream, consumer_config(name, filter_subject, d, max_ack_pending=1))
                # one pull asks for the next PARTITION_PULL messages: the server still hands out one at a
                # time (max_ack_pending=1), the next as soon as the last is acknowledged, without a pull
                # request per message
                await self._consume(
                    DurableConsumer(
                        self.bus.nc, stream, name, handle, lanes=1, batch=PARTITION_PULL, ack_wait=d.ack_wait
                    ),
                    agent,
                )
            return
        await js.add_consumer(stream, consumer_config(agent.name, narrowed or info.subscribe_subject, d))
        handle = self._traced(agent, handler, self._durable_handler(agent, handler, d, None))
        await self._consume(
            DurableConsumer(
                self.bus.nc, stream, agent.name, handle, lanes=agent.max_concurrency, batch=d.batch, ack_wait=d.ack_wait
            ),
            agent,
        )

    def _namespaced(self, handler: Handler) -> tuple[ContractInfo, str | None]:
        """The handler's contract and narrowed subject under the bus's subject prefix."""
        narrowed = self.bus.prefix + handler.subject if handler.subject else None
        return self.bus.namespaced(handler.contract), narrowed

    async def _consume(self, consumer: DurableConsumer, agent: Agent) -> None:
        self._consumers.append(consumer)
        await consumer.start()
        self._unlisten.append(self.bus.on_reconnected(consumer.reconnected))
        # A message whose handler never settles it (its process dies or hangs each time) is
        # not redelivered after max_deliver; JetStream says so in an advisory: dead-letter it.
        subject = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{consumer.stream}.{consumer.consumer}"
        handle = functools.partial(self._on_max_deliveries, agent)
        self._mailboxes.append(await self.bus.mailbox(subject, handle, queue=agent.name))

    async def _on_max_deliveries(self, agent: Agent, advisory: Msg) -> None:
        try:
            reason = await write_max_deliveries_dead_letter(self.bus, agent.name, advisory)
        except (ValueError, KeyError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.error(
                "%s: could not dead-letter after a max-deliveries advisory (%r): %r",
                agent.name,
                advisory.data[:500],
                exc,
            )
            return
        self.stats[agent.name].dead_lettered += 1
        self.services[agent.name].dead_lettered_in(advisory.subject.split(".")[5])  # ...MAX_DELIVERIES.<stream>.<c>
        log.warning("dead letter from %s (max-deliveries): %s", agent.name, reason)

    def _durable_handler(
        self, agent: Agent, handler: Handler, d: Durability, strip: Callable[[str], str] | None
    ) -> HandleMsg:
        """Like :meth:`_handler`, but settles each JetStream message: ack, nak with backoff, or term."""
        read = _reader(handler.contract, handler.read_as)
        func: Callable[[Any, Context], Awaitable[Any]] = getattr(agent, handler.attr)
        bus = self.bus
        nc = bus.nc
        logger = logging.getLogger(f"busagents.agent.{agent.name}")
        stats = self.stats[agent.name]
        dead_letter = self._dead_letter_durable
        emit = self._emit
        max_deliver = d.max_deliver
        views = self._agent_views[agent.name]

        async def handle(msg: Msg) -> Outcome:
            headers = msg.headers
            subject = strip(msg.subject) if strip is not None else msg.subject
            try:
                body = read(msg)
            except _Refused as refused:
                await dead_letter(agent, msg, subject, refused.stage, refused.reason)
                return Outcome.DEAD_LETTERED
            if headers is None or MSG_ID not in headers:  # a plain client's: its place in the stream is its id
                stream, seq = stream_sequence(msg.reply)
                headers = {**(headers or {}), MSG_ID: f"{stream}.{seq}"}
            ctx = Context(agent, bus, logger, headers, subject, data=msg.data, derive_ids=True, views=views)
            stats.in_flight += 1
            try:
                result = await func(body, ctx)
                if result is not None:
                    published = await emit(agent, ctx, result)
                    stats.published += published
            except PERMANENT_ERRORS as exc:
                await dead_letter(agent, msg, subject, "handler", f"{type(exc).__name__}: {exc}")
                return Outcome.DEAD_LETTERED
            except Exception as exc:
                delivered = delivery_count(msg.reply)
                if delivered >= max_deliver:
                    reason = f"{type(exc).__name__}: {exc} (after {delivered} deliveries)"
                    await dead_letter(agent, msg, subject, "max-deliveries", reason)
                    return Outcome.DEAD_LETTERED
                delay = backoff_delay(d, delivered)
                logger.warning(
                    "handler %s failed on %s (delivery %d of %d, retry in %.1fs): %r",
                    handler.attr,
                    subject,
                    delivered,
                    max_deliver,
                    delay,
                    exc,
                )
                await nak(nc, msg, delay)
                return Outcome.RETRY
            finally:
                stats.in_flight -= 1
            await ack(nc, msg)
            stats.handled += 1
            return Outcome.HANDLED

        return handle

    async def _dead_letter_durable(self, agent: Agent, msg: Msg, subject: str, stage: str, reason: str) -> None:
        """Store the dead letter in the DLQ stream, then terminate the message; nak it if storing failed."""
        self.stats[agent.name].dead_lettered += 1
        reason = bounded_reason(reason)
        log.warning("dead letter from %s (%s): %s", agent.name, stage, reason)
        try:
            await write_durable_dead_letter(self.bus, agent.name, msg, subject, stage, reason)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.error(
                "could not store the dead letter of %s (%r); it will be redelivered. Reason was: %s",
                agent.name,
                exc,
                reason,
            )
            await nak(self.bus.nc, msg, 1.0)
            return
        await term(self.bus.nc, msg)

    # Internals

    def _root_context(self, agent: Agent) -> Context:
        return Context(agent, self.bus, logging.getLogger(f"busagents.agent.{agent.name}"))

    async def _run_loop(self, agent: Agent) -> None:
        try:
            await agent.run(self._root_context(agent))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s: run() failed; its handlers keep serving", agent.name)

    async def _publish_schemas(self) -> None:
        """Write the schemas of the contracts the agents use to the contracts registry (:mod:`busagents.registry`)."""
        instances = [(agent, self.services[agent.name].id) for agent in self.agents]
        self._registry_keys = await publish_schemas(self.bus, instances)

    async def _heartbeat(self) -> None:
        encoder = msgspec.json.Encoder()
        instance = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            for stats in self.stats.values():
                payload = {**asdict(stats), "instance": instance, "time": time.time()}
                with contextlib.suppress(nats.errors.Error):
                    await self.bus.nc.publish(stats_subject(stats.agent), encoder.encode(payload))
            await asyncio.sleep(self.heartbeat_interval)

    def _handler(self, agent: Agent, handler: Handler) -> HandleMsg:
        info = handler.contract
        read = _reader(info, handler.read_as)
        func: Callable[[Any, Context], Awaitable[Any]] = getattr(agent, handler.attr)
        reply_cls = info.reply if info.kind is Kind.QUERY else None
        bus = self.bus
        views = self._agent_views[agent.name]  # filled before the agent's queries are subscribed
        logger = logging.getLogger(f"busagents.agent.{agent.name}")
        stats = self.stats[agent.name]
        # only a query's requester waits for an answer; any other reply subject is not ours to write to
        dead_letter = functools.partial(self._dead_letter, answer=reply_cls is not None)
        emit = self._emit

        async def handle(msg: Msg) -> Outcome:
            headers = msg.headers
            try:
                body = read(msg)
            except _Refused as refused:
                await dead_letter(agent, msg, refused.stage, refused.reason)
                return Outcome.DEAD_LETTERED
            ctx = Context(
                agent, bus, logger, headers if headers is not None else {}, msg.subject, data=msg.data, views=views
            )
            stats.in_flight += 1
            try:
                result = await func(body, ctx)
                if reply_cls is not None:
                    await _reply(bus, agent, msg, ctx, result, reply_cls)
                elif result is not None:
                    published = await emit(agent, ctx, result)
                    stats.published += published
            except Exception as exc:
                await dead_letter(agent, msg, "handler", f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, (UndeclaredContractError, ContractError)):
                    logger.warning("handler %s failed on %s: %r", handler.attr, msg.subject, exc)
                return Outcome.DEAD_LETTERED
            finally:
                stats.in_flight -= 1
            stats.handled += 1
            return Outcome.HANDLED

        return handle

    async def _emit(self, agent: Agent, ctx: Context, result: Any) -> int:
        messages = result if isinstance(result, (list, tuple)) else (result,)
        for message in messages:  # check them all before anything leaves the process
            ctx._check(message)
            if contract_info(type(message)).kind is Kind.QUERY:
                raise ContractError(f"a handler cannot return the query {type(message).__name__}; use ctx.request")
        if len(messages) == 1:
            await ctx.publish(messages[0])
        elif messages:
            await ctx.publish_many(messages)
        return len(messages)

    async def _dead_letter(self, agent: Agent, msg: Msg, stage: str, reason: str, *, answer: bool = False) -> None:
        """Send the dead letter (stored with an ack when the DLQ stream exists); answer a query's requester."""
        self.stats[agent.name].dead_lettered += 1
        reason = bounded_reason(reason)
        log.warning("dead letter from %s (%s): %s", agent.name, stage, reason)
        try:
            await write_dead_letter(
                self.bus,
                agent.name,
                stage,
                reason,
                subject=msg.subject,
                data=msg.data,
                headers=msg.headers,
                store=self._dlq_stream,
            )
        except (nats.errors.Error, nats.js.errors.Error):
            log.exception("could not send the dead letter of %s; reason was: %s", agent.name, reason)
        if answer and msg.reply and not self.bus.dry_run:  # a dry run's error answers nobody either
            try:
                await self.bus.nc.publish(msg.reply, b"", headers={ERROR_HEADER: reason})
            except nats.errors.Error:
                log.exception("%s could not send the error reply of a query on %s", agent.name, msg.subject)


class _Refused(Exception):
    """A message an agent does not handle: another contract or version, or bytes that do not decode."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def _reader(info: ContractInfo, read_as: type[Any] | None = None) -> Callable[[Msg], Any]:
    """What core and durable handlers check before the handler runs: the contract and version a message
    says it carries, then its body, decoded (into ``read_as`` when given; upcast from an earlier
    version, when the contract has an upcaster for it); raises :class:`_Refused` with the dead
    letter's stage."""
    decode = codec_for(info.cls).decode if read_as is None else projection_decoder(info.cls, read_as)
    name = info.name
    version = str(info.version)
    upcast = _upcaster(info)
    if read_as is not None:
        upcast_contract = upcast

        def upcast(sent: str, data: bytes) -> Any:
            try:
                return decode(encode(upcast_contract(sent, data)))
            except DecodeError as exc:
                raise _Refused("decode", f"{exc} (upcast from version {sent})") from None

    def read(msg: Msg) -> Any:
        headers = msg.headers
        if headers is not None:
            sent = headers.get(CONTRACT)
            if sent is not None and sent != name:
                raise _Refused("contract", f"expected contract {name}, got {sent}")
            sent = headers.get(VERSION)
            if sent is not None and sent != version:
                return upcast(sent, msg.data)
        try:
            return decode(msg.data)
        except DecodeError as exc:
            raise _Refused("decode", str(exc)) from None

    return read


def _upcaster(info: ContractInfo) -> Callable[[str, bytes], Any]:
    """Decodes a body sent as another version of ``info`` and upcasts it, or refuses the version
    naming those accepted (``accepted 1 (upcast), 2``); off the path of messages of ``info``'s version."""
    chains = {str(v): (codec_for(source).decode, chain) for v, (source, chain) in upcasters(info.cls).items()}
    accepted = ", ".join(
        f"{v} (upcast)" if v != info.version else str(v) for v in sorted({*map(int, chains), info.version})
    )

    def upcast(sent: str, data: bytes) -> Any:
        found = chains.get(sent)
        if found is None:
            raise _Refused("version", f"version {sent} of {info.name} is not accepted here: accepted {accepted}")
        decode, chain = found
        try:
            old = decode(data)
        except DecodeError as exc:
            raise _Refused("decode", f"{exc} (sent as version {sent})") from None
        try:
            new = chain(old)
        except Exception as exc:
            raise _Refused(
                "upcast", f"upcasting {info.name} {sent} -> {info.version}: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(new, info.cls):
            raise _Refused(
                "upcast", f"the upcaster of {info.name} {sent} returned {type(new).__name__}, not {info.cls.__name__}"
            )
        return new

    return upcast


async def _reply(bus: Bus, agent: Agent, msg: Msg, ctx: Context, result: Any, reply_cls: type[Any]) -> None:
    if not isinstance(result, reply_cls):
        raise ContractError(f"query handler returned {type(result).__name__}, expected {reply_cls.__name__}")
    if not msg.reply:
        return
    info = contract_info(reply_cls)
    envelope = Envelope.new(info.name, info.version, sender=agent.name, cause=ctx.envelope)
    if bus.dry_run:  # a shadow answering beside the live agent: its answer is recorded, never sent
        await record(bus, msg.subject, encode(result), envelope.to_headers())
        return
    await bus.nc.publish(msg.reply, encode(result), headers=envelope.to_headers())
