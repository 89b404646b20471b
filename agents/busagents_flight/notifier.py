"""The notifier: tells every passenger of a changed booking what happened, through a channel.

The channel is pluggable (:class:`Channel`); the default appends each message to
a local outbox file (JSON lines), standing in for e-mail / SMS / push.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import IO

import msgspec
from busagents_travel import BookingChanged, Leg, PassengerNotified

from busagents import Agent, Context, on

from .settings import FlightSettings

__all__ = ["Channel", "Notice", "Notifier", "OutboxChannel", "render"]


class Notice(msgspec.Struct, kw_only=True):
    """One message to one passenger."""

    passenger_id: str
    name: str
    booking_id: str
    subject: str
    text: str


class Channel(abc.ABC):
    """Where notices go. ``name`` is recorded in ``PassengerNotified.channel``."""

    name: str = "channel"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare to send (connect, open files)."""

    @abc.abstractmethod
    async def send(self, notice: Notice) -> None:
        """Deliver one notice."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release what ``open`` acquired."""


class OutboxChannel(Channel):
    """Appends notices to a JSON-lines outbox file."""

    name = "outbox"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._encode = msgspec.json.Encoder().encode

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")

    async def send(self, notice: Notice) -> None:
        if self._file is None:
            await self.open()
        assert self._file is not None
        self._file.write(self._encode(notice) + b"\n")
        self._file.flush()  # in the file before PassengerNotified says so, even if the process is killed next

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Notifier(Agent):
    """``BookingChanged`` -> one notice per passenger -> ``PassengerNotified``."""

    name = "flight-notifier"
    produces = (PassengerNotified,)
    max_concurrency = 4

    def __init__(self, channel: Channel | None = None) -> None:
        self.channel = channel if channel is not None else OutboxChannel(FlightSettings().outbox)

    async def on_start(self, ctx: Context) -> None:
        await self.channel.open()

    async def on_stop(self, ctx: Context) -> None:
        await self.channel.close()

    @on(BookingChanged)
    async def notify(self, change: BookingChanged, ctx: Context) -> list[PassengerNotified]:
        out = []
        for index, passenger in enumerate(change.passengers):
            subject, text = render(change, index)
            await self.channel.send(
                Notice(
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
