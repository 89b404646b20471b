"""The notifier: tells every passenger of a changed booking what happened, through a channel.

The channel is pluggable (:class:`Channel`); the default appends each message to
a local outbox file (JSON lines), standing in for e-mail / SMS / push. ``BookingsChanged``
arrives at least once, so channels send idempotently on ``(decision_id, passenger_id)``:
each passenger is notified once per outcome, whatever the replicas, kills and redeliveries.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import msgspec
from busagents_travel import BookingChanged, BookingsChanged, Leg, PassengerNotified

from busagents import Agent, Context, on

from .settings import FlightSettings

__all__ = ["Channel", "Notice", "Notifier", "OutboxChannel", "render"]

log = logging.getLogger("busagents_flight.notifier")

T = TypeVar("T")

_CHUNK = 1 << 20  # bytes read at a time when catching up with the outbox


class Notice(msgspec.Struct, kw_only=True):
    """One message to one passenger about one outcome, identified by ``(decision_id, passenger_id)``."""

    decision_id: str
    disruption_id: str
    passenger_id: str
    name: str
    booking_id: str
    subject: str
    text: str


class Channel(abc.ABC):
    """Where notices go. ``name`` is recorded in ``PassengerNotified.channel``.

    ``BookingsChanged`` is delivered at least once: a notifier that dies before the ack gets
    the change again, maybe in another replica, and sends the same notices again. For each
    passenger to be notified exactly once per outcome, a channel must be idempotent on
    ``(notice.decision_id, notice.passenger_id)``: a notice whose key was already sent (by this
    process, another replica or before a restart) is skipped without error, and checking and
    sending are one atomic step across replicas (a lock, the provider's idempotency key, a
    unique constraint). A channel that does less notifies at least once.
    """

    name: str = "channel"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare to send (connect, open files)."""

    @abc.abstractmethod
    async def send(self, notice: Notice) -> None:
        """Deliver one notice, unless its ``(decision_id, passenger_id)`` was sent already."""

    async def send_many(self, notices: Sequence[Notice]) -> None:
        """Deliver the notices of one ``BookingsChanged``, in order; the default calls :meth:`send` for each.

        Override it to send them in one go; each notice is still sent at most once. When it
        returns, every notice is sent (now or before): ``PassengerNotified`` follows.
        """
        for notice in notices:
            await self.send(notice)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release what ``open`` acquired."""


class _Key(msgspec.Struct):
    """What the outbox channel reads of a line: the key of the notice."""

    decision_id: str = ""
    passenger_id: str = ""


class OutboxChannel(Channel):
    """Appends notices to a JSON-lines outbox file, one line per ``(decision_id, passenger_id)``.

    Any number of processes may share the file. Under an exclusive ``flock`` on it, a batch
    reads the lines others appended since its last read (keeping their keys in memory), cuts
    a torn last line left by a writer killed mid-write, skips the keys already in the file and
    appends the rest with one ``write``: in the file before ``PassengerNotified`` says so, even
    if the process is killed next. The file I/O runs in one worker thread, in call order.
    A reader of the outbox ignores a last line without a newline: it is being written or torn.
    """

    name = "outbox"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = -1
        self._identity = (0, 0)  # (device, inode) of the open file: a moved or deleted outbox is reopened
        self._read_to = 0  # end of the last complete line this channel read or wrote
        self._sent: set[tuple[str, str]] = set()  # keys of the lines up to _read_to
        self._executor: ThreadPoolExecutor | None = None
        self._encode = msgspec.json.Encoder().encode
        self._decode_key = msgspec.json.Decoder(_Key).decode

    async def open(self) -> None:
        await self._run(self._catch_up_locked)

    async def send(self, notice: Notice) -> None:
        await self.send_many((notice,))

    async def send_many(self, notices: Sequence[Notice]) -> None:
        if notices:
            await self._run(self._append, notices)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_file)
        finally:
            executor.shutdown()  # idle: the close was its last job

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the channel's one thread: calls run one at a time, in order."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox:{self.path.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # In the channel's thread

    def _append(self, notices: Sequence[Notice]) -> None:
        with self._exclusive():
            fresh: dict[tuple[str, str], bytes] = {}
            for notice in notices:
                key = (notice.decision_id, notice.passenger_id)
                if key not in self._sent and key not in fresh:
                    fresh[key] = self._encode(notice) + b"\n"
            if not fresh:
                return
            data = b"".join(fresh.values())
            view = memoryview(data)
            while view:  # a regular file takes it in one write, unless a signal or a full disk cuts it short
                view = view[os.write(self._fd, view) :]
            self._read_to += len(data)
            self._sent.update(fresh)

    def _catch_up_locked(self) -> None:
        with self._exclusive():
            pass

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the outbox's exclusive lock, caught up with every complete line in it."""
        while True:
            if self._fd < 0:
                self._open_file()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if self._is_current():
                break
            log.warning("outbox %s was moved or deleted: writing to a new file at that path", self.path)
            self._close_file()  # and so unlock
        try:
            self._catch_up()
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _open_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._read_to = 0
        self._sent.clear()

    def _is_current(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _catch_up(self) -> None:
        """Remember the keys of the lines appended since ``_read_to``; cut a torn last line (under the lock)."""
        size = os.fstat(self._fd).st_size
        if size < self._read_to:
            log.warning("outbox %s was truncated: reading it again from the start", self.path)
            self._read_to = 0
            self._sent.clear()
        pending = b""  # bytes after the last newline read so far
        position = self._read_to
        while position < size:
            chunk = os.pread(self._fd, min(size - position, _CHUNK), position)
            if not chunk:
                break
            position += len(chunk)
            buffer = pending + chunk
            end = buffer.rfind(b"\n") + 1
            if end:
                for line in buffer[: end - 1].split(b"\n"):
                    self._remember(line)
            self._read_to += end
            pending = buffer[end:]
        if self._read_to < size:
            # Nobody writes while we hold the lock: this is the end of a line whose writer died mid-write.
            log.warning("outbox %s: cutting a torn last line of %d bytes", self.path, size - self._read_to)
            os.ftruncate(self._fd, self._read_to)

    def _remember(self, line: bytes) -> None:
        if not line:
            return
        try:
            key = self._decode_key(line)
        except msgspec.DecodeError as exc:
            log.warning("outbox %s: ignoring a line that is not a notice (%s): %.80r", self.path, exc, line)
            return
        self._sent.add((key.decision_id, key.passenger_id))


class Notifier(Agent):
    """``BookingsChanged`` -> one notice per passenger of each change (once per outcome) -> ``PassengerNotified``."""

    name = "flight-notifier"
    produces = (PassengerNotified,)
    max_concurrency = 4

    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel if channel is not None else OutboxChannel(FlightSettings().outbox)

    async def on_start(self, ctx: Context) -> None:
        await self.channel.open()

    async def on_stop(self, ctx: Context) -> None:
        await self.channel.close()

    @on(BookingsChanged)
    async def notify(self, changed: BookingsChanged, ctx: Context) -> list[PassengerNotified]:
        notices, out = [], []
        for change in changed.changes:
            for index, passenger in enumerate(change.passengers):
                subject, text = render(change, index)
                notices.append(
                    Notice(
                        decision_id=change.decision_id,
                        disruption_id=change.disruption_id,
                        passenger_id=passenger.passenger_id,
                        name=passenger.name,
                        booking_id=change.booking_id,
                        subject=subject,
                        text=text,
                    )
                )
                out.append(
                    PassengerNotified(
                        disruption_id=change.disruption_id,
                        decision_id=change.decision_id,
                        booking_id=change.booking_id,
                        passenger_id=passenger.passenger_id,
                        action=change.action,
                        channel=self.channel.name,
                        text=text,
                    )
                )
        # Sent now or by an earlier delivery: either way the passengers know, and say so again
        # (the events' ids derive from this message's id, so a redelivery's copies are dropped).
        await self.channel.send_many(notices)
        return out


def render(change: BookingChanged, index: int) -> tuple[str, str]:
    """The subject and text of the message to the booking's passenger number ``index``."""
    first = change.passengers[index].name.split()[0]
    if change.action == "rebook":
        subject = f"Booking {change.booking_id}: you have been rebooked"
        body = f"Dear {first}, your trip has changed. New itinerary: {_itinerary(change.new_legs, index)}."
    elif change.action == "refund":
        subject = f"Booking {change.booking_id}: refunded"
        body = f"Dear {first}, we could not find you another flight today, so your booking is refunded."
    else:
        subject = f"Booking {change.booking_id}: your flight is delayed"
        body = f"Dear {first}, your booking stays as it is."
    extras = []
    if change.cost.refund:
        extras.append(f"Refund: {change.cost.currency} {change.cost.refund / 100:,.2f}.")
    if change.action != "keep":
        extras.append("No fee to pay." if change.cost.payable == 0 else f"To pay: {change.cost.payable / 100:,.2f}.")
    if change.hotel:
        extras.append("A hotel room is booked for you; show this message at the transfer desk.")
    return subject, " ".join([body, f"Why: {change.rationale}.", *extras])


def _itinerary(legs: list[Leg], index: int) -> str:
    return "; ".join(
        f"{leg.number} {leg.origin} {_hm(leg.departure)} -> {leg.destination} {_hm(leg.arrival)}, "
        f"seat {leg.seats[index]}"
        for leg in legs
    )


def _hm(t: int) -> str:
    return time.strftime("%H:%M", time.gmtime(t))
