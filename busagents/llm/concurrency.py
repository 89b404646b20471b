"""How many model calls one agent replica keeps in flight: adapted to what the API answers.

While calls wait for a slot, every call the API answers without a 429 adds one slot (up to
``maximum``); a wave of 429s halves the limit once (down to ``minimum``): one halving per
``retry-after`` window (at least a second), so sporadic 429s cost a little and a sustained
push-back brings the limit down to what the API accepts. The 429'd request itself waits out its
``retry-after`` (the SDK's retry); once the limit is at its minimum, no new call starts before
that ``retry-after`` has passed either. When the API's rate-limit headers say fewer requests
remain than are in flight, the limit does not grow. Waiting calls are served in order of
``priority`` (smaller first: the earliest departure), not of arrival.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["AdaptiveLimit"]

_DECREASE = 0.5


class AdaptiveLimit:
    """A priority semaphore whose size follows the API's answers."""

    def __init__(self, initial: int, *, minimum: int = 1, maximum: int | None = None) -> None:
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum if maximum is not None else initial)
        self.limit = float(min(max(initial, self.minimum), self.maximum))
        self.in_flight = 0
        self.max_in_flight = 0
        self.throttled = 0  # 429s seen
        self.history: list[tuple[float, int]] = [(time.monotonic(), int(self.limit))]  # (when, limit) on change
        self._paused_until = 0.0
        self._calm_until = 0.0
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._wake: asyncio.TimerHandle | None = None

    @property
    def current(self) -> int:
        return int(self.limit)

    @asynccontextmanager
    async def slot(self, priority: float = 0.0) -> AsyncIterator[None]:
        """Hold one slot for a model call; callers with a smaller ``priority`` go first."""
        await self._acquire(priority)
        try:
            yield
        finally:
            self.in_flight -= 1
            self._release_waiters()

    async def _acquire(self, priority: float) -> None:
        if not self._waiters and self._free():
            self._take()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), future))
        self._release_waiters()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # the slot was given to us: hand it on
                self.in_flight -= 1
                self._release_waiters()
            raise

    def _free(self) -> bool:
        return self.in_flight < int(self.limit) and time.monotonic() >= self._paused_until

    def _take(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _release_waiters(self) -> None:
        while self._waiters and self._free():
            _, _, future = heapq.heappop(self._waiters)
            if future.done():
                continue
            self._take()
            future.set_result(None)
        pause = self._paused_until - time.monotonic()
        if self._waiters and pause > 0 and self._wake is None:
            self._wake = asyncio.get_running_loop().call_later(pause, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._release_waiters()

    def succeeded(self, remaining_requests: int | None = None) -> None:
        """A call was answered without a 429: one slot more while calls wait, unless the API says few
        requests remain."""
        if remaining_requests is not None and remaining_requests <= self.in_flight:
            return
        if not self._waiters:  # the limit is not what holds calls back
            return
        self._set(min(self.maximum, self.limit + 1.0))

    def throttled_by(self, retry_after: float | None, count: int = 1) -> None:
        """The API answered 429 (``count`` times): halve the limit and start nothing before ``retry_after`` seconds."""
        self.throttled += count
        now = time.monotonic()
        at_minimum = int(self.limit) <= self.minimum
        if now >= self._calm_until:  # one decrease per wave of 429s, as TCP decreases once per round trip
            self._set(max(self.minimum, self.limit * _DECREASE))
            self._calm_until = now + max(retry_after or 0.0, 1.0)
        if retry_after and at_minimum:  # pushed back even at the minimum: everyone waits
            self._paused_until = max(self._paused_until, now + retry_after)

    def _set(self, limit: float) -> None:
        before = int(self.limit)
        self.limit = limit
        if int(limit) != before:
            self.history.append((time.monotonic(), int(limit)))
            if len(self.history) > 10_000:
                del self.history[: len(self.history) // 2]
        self._release_waiters()
