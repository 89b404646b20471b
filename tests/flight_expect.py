"""Await the items of grouped contracts (``BookingsChanged.changes``, ``RebookGroup.decisions``).

``bus.expect`` counts messages; a group carries several items, so these count the items that
match, whatever groups they came in::

    async with expect_changes(bus, where=lambda c: c.booking_id == "B1") as changed:
        await bus.publish(decision)
    assert changed.items[0].new_legs
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import nats.errors
from busagents_travel import BookingChanged, BookingsChanged, RebookGroup, RebookPassenger
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from busagents import Bus
from busagents.codec import codec_for
from busagents.contract import contract_info

G = TypeVar("G")
I = TypeVar("I")  # noqa: E741 - the item type


class Items(Generic[G, I]):
    """Subscribes to ``contract`` on entering; on leaving, waits until ``count`` items matched
    ``where`` (an ``AssertionError`` after ``timeout`` s). ``items`` lists them in arrival order."""

    def __init__(
        self,
        bus: Bus,
        contract: type[G],
        unpack: Callable[[G], Sequence[I]],
        where: Callable[[I], bool] | None,
        count: int,
        timeout: float,
    ) -> None:
        self._bus, self._info, self._unpack = bus, contract_info(contract), unpack
        self._where, self._count, self._timeout = where, count, timeout
        self._decode = codec_for(self._info.cls).decode
        self._done: asyncio.Future[None] | None = None
        self._sub: Subscription | None = None
        self.items: list[I] = []
        self.groups = 0  # messages that brought at least one matching item

    async def _on_msg(self, msg: Msg) -> None:
        matched = [i for i in self._unpack(self._decode(msg.data)) if self._where is None or self._where(i)]
        if matched:
            self.items.extend(matched)
            self.groups += 1
        if len(self.items) >= self._count and self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def __aenter__(self) -> Items[G, I]:
        self._done = asyncio.get_running_loop().create_future()
        self._sub = await self._bus.nc.subscribe(self._bus.subject(self._info.subscribe_subject), cb=self._on_msg)
        await self._bus.nc.flush()
        return self

    async def wait(self) -> list[I]:
        """Wait until ``count`` items matched (an ``AssertionError`` after ``timeout`` s)."""
        assert self._done is not None, "enter the block first"
        try:
            await asyncio.wait_for(asyncio.shield(self._done), self._timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {self._count} items of {self._info.name} within {self._timeout}s, got {len(self.items)}"
            ) from None
        return self.items

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if exc_type is None:
                await self.wait()
        finally:
            if self._sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await self._sub.unsubscribe()


def expect_changes(
    bus: Bus, *, where: Callable[[BookingChanged], bool] | None = None, count: int = 1, timeout: float = 5.0
) -> Items[BookingsChanged, BookingChanged]:
    """The ``BookingChanged`` items of ``BookingsChanged`` messages."""
    return Items(bus, BookingsChanged, _changes, where, count, timeout)


def expect_decisions(
    bus: Bus, *, where: Callable[[RebookPassenger], bool] | None = None, count: int = 1, timeout: float = 5.0
) -> Items[RebookGroup, RebookPassenger]:
    """The decisions of ``RebookGroup`` messages."""
    return Items(bus, RebookGroup, _decisions, where, count, timeout)


def _changes(m: BookingsChanged) -> list[BookingChanged]:
    return m.changes


def _decisions(m: RebookGroup) -> list[RebookPassenger]:
    return m.decisions
