"""Views: every replica of an agent reads every message of a stream, from its start, in order.

``@on(C, view=True)`` is for an agent that keeps a materialised view (the state of the
world as a stream of events made it) and answers queries from it. A queue group would
split the events between replicas, so each would know only part of the world; a view
subscription instead gives each replica its own JetStream *ordered consumer* over the
contract's stream, starting at the first message kept. A replica that starts late (a
restart, a new replica) therefore rebuilds the same view as the others by replaying the
stream, and then follows it live.

Until every view subscription of an agent has caught up with what its stream held when
the replica started, the worker does not subscribe the agent's query handlers: a
replica that would answer from a half-built view is not in the queue group, so queries
go to replicas that are ready (and fail fast with "no responders" when none is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ._natspy import heartbeat_check_died, next_pushed, stream_position
from ._tasks import cancel_and_wait

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = ["ViewConsumer", "view_permissions"]

log = logging.getLogger("busagents.view")

#: Seconds between the server's idle heartbeats on a view's consumer; two missed ones mean it is gone.
_HEARTBEAT = 2.0
_STOP_TIMEOUT = 30.0  # seconds stop() waits for the view's tasks to end


class ViewConsumer:
    """One replica's ordered, ack-less replay of a stream, then its live tail.

    ``handle`` is called for each message in stream order, one at a time. :meth:`ready`
    completes once every message the stream held at :meth:`start` has been handled.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        handle: Callable[[Msg], Awaitable[None]],
        *,
        label: str = "",
    ) -> None:
        self._js = js
        self.stream = stream
        self.filter_subject = filter_subject
        self._handle = handle
        self.label = label or f"{stream}:{filter_subject}"
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._backlog = 0  # messages the stream held at start: handled before we are ready
        self._last = 0  # stream sequence of the last message handled
        self._watchdog: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # catch_up(): (stream sequence, waiter)
        self.handled = 0
        self.replay_seconds = 0.0

    async def start(self) -> None:
        """Create the ordered consumer and start handling; returns before the replay is done."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._sub = await self._subscribe(None)
        info = await self._sub.consumer_info()
        self._backlog = int(info.num_pending or 0) + int(info.delivered.consumer_seq or 0)
        if self._backlog == 0:
            self._mark_ready(started)
        self._task = asyncio.create_task(self._loop(started), name=f"view:{self.label}")
        self._watchdog = asyncio.create_task(self._watch(), name=f"view-watchdog:{self.label}")

    async def _subscribe(self, from_seq: int | None) -> Any:
        """An ordered consumer from the stream's start, or from ``from_seq``."""
        config = None
        if from_seq is not None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq)
        return await self._js.subscribe(
            self.filter_subject,
            stream=self.stream,
            ordered_consumer=True,
            config=config,
            deliver_policy=None if config else api.DeliverPolicy.ALL,
            idle_heartbeat=_HEARTBEAT,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    async def _watch(self) -> None:
        """nats-py recreates an ordered consumer that went silent (a server or leader lost) from a task
        that ends for good if that recreation fails (a cluster still electing): then do it ourselves,
        from the message after the last one handled."""
        while True:
            await asyncio.sleep(_HEARTBEAT * 2)
            if not heartbeat_check_died(self._sub):
                continue
            log.warning("view %s: its ordered consumer stopped; resuming after sequence %d", self.label, self._last)
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self._sub.unsubscribe()
            while True:
                try:
                    self._sub = await self._subscribe(self._last + 1)
                    break
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning("view %s: could not resume yet (%r); trying again", self.label, exc)
                    await asyncio.sleep(_HEARTBEAT)

    def _mark_ready(self, started: float) -> None:
        if not self._ready.is_set():
            self.replay_seconds = asyncio.get_running_loop().time() - started
            self._ready.set()
            log.info("view %s ready: %d message(s) replayed in %.2fs", self.label, self.handled, self.replay_seconds)

    async def _loop(self, started: float) -> None:
        handle = self._handle
        while True:
            sub = self._sub
            try:
                msg = await next_pushed(sub, _HEARTBEAT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # or the watchdog replaced the subscription: read the new one
            except nats.errors.BadSubscriptionError:
                await asyncio.sleep(0.1)  # replaced by the watchdog in the meantime
                continue
            try:
                seq, pending = stream_position(msg)
            except (nats.errors.NotJSMessageError, ValueError):
                seq, pending = self._last + 1, -1  # -1: not known
            if seq <= self._last:
                continue  # a resumed consumer may start with what we already have
            self._last = seq
            try:
                await handle(msg)
            except Exception:
                log.exception("view %s: unhandled error on %s", self.label, msg.subject)
            self.handled += 1
            if self._waiters:
                self._wake(seq)
            if not self._ready.is_set() and (self.handled >= self._backlog or pending == 0):
                self._mark_ready(started)

    async def catch_up(self, timeout: float = 10.0) -> None:
        """Wait until every message the stream holds *now* (for this view) has been handled.

        For an answer that must not be older than the event stream: an event stored before
        the question is in the view when this returns.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self._sub.consumer_info()
            target = int(info.delivered.stream_seq or 0)
            if self._last >= target and not info.num_pending:
                return
            if self._last < target:
                waiter = loop.create_future()
                self._waiters.append((target, waiter))
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            elif loop.time() > deadline:
                raise TimeoutError(f"view {self.label} did not catch up with its stream within {timeout}s")
            else:
                await asyncio.sleep(0.005)  # delivered up to target, more on the way to us

    def _wake(self, seq: int) -> None:
        keep = []
        for target, waiter in self._waiters:
            if seq >= target:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._waiters = keep

    async def ready(self, timeout: float | None = None) -> None:
        """Wait until the replay of what the stream held at start is handled."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def stop(self) -> None:
        """Stop after the message in hand (if any); the ordered consumer is ephemeral and goes with us."""
        await cancel_and_wait([t for t in (self._watchdog, self._task) if t is not None], _STOP_TIMEOUT)
        self._task = self._watchdog = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None


def view_permissions(stream: str) -> set[str]:
    """NATS publish permissions of a view subscription on ``stream`` (its messages come to the agent's inbox).

    An ordered consumer is ephemeral: created (again after a gap or a reconnect), asked for its
    info, and answered on flow control.
    """
    return {
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    }
