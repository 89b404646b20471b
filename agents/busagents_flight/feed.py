"""The status feed simulator: a seeded stream of ``FlightStatusUpdated`` for an airline day.

Like a real operational feed it is noisy: some updates are repeated, some arrive
out of order (an older ``seq`` after a newer one), and some delays are later
reduced. :func:`status_feed` plans the stream; :func:`publish_feed` plays it on the
bus at an accelerated clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from busagents_travel import Flight, FlightStatusUpdated

from busagents import Agent, Bus, Context

from .data import AirlineDay, generate
from .settings import FlightSettings

__all__ = ["FeedProfile", "StatusFeed", "publish_feed", "status_feed"]

_MIN = 60


@dataclass(frozen=True)
class FeedProfile:
    """How disrupted and how noisy the day is (fractions of flights / of updates)."""

    cancelled: float = 0.03
    delayed: float = 0.12
    long_delays: float = 0.35  # of the delayed flights: beyond 3 h
    reduced: float = 0.25  # of the delayed flights: the delay is later reduced
    gate_changes: float = 0.10
    repeated: float = 0.05  # updates sent twice
    out_of_order: float = 0.04  # updates overtaken by the next one of the same flight


def status_feed(
    day: AirlineDay, seed: int | None = None, profile: FeedProfile | None = None
) -> list[FlightStatusUpdated]:
    """The day's status updates in the order the feed delivers them."""
    profile = profile or FeedProfile()
    rng = random.Random(day.seed if seed is None else seed)
    flights = day.flights
    n = len(flights)
    order = rng.sample(range(n), n)
    n_cancel = max(1, round(n * profile.cancelled))
    n_delay = max(1, round(n * profile.delayed))
    cancelled = set(order[:n_cancel])
    delayed = set(order[n_cancel : n_cancel + n_delay])
    timed: list[tuple[int, int, FlightStatusUpdated]] = []  # (deliver at, tiebreak, update)
    tiebreak = 0
    for i, flight in enumerate(flights):
        updates = _flight_updates(flight, i in cancelled, i in delayed, profile, rng)
        for j, update in enumerate(updates):
            deliver = update.observed_at
            if j + 1 < len(updates) and rng.random() < profile.out_of_order:
                deliver = updates[j + 1].observed_at + 1  # overtaken by its successor
            timed.append((deliver, tiebreak, update))
            tiebreak += 1
            if rng.random() < profile.repeated:
                timed.append((deliver + rng.randrange(1, 600), tiebreak, update))
                tiebreak += 1
    timed.sort(key=lambda t: (t[0], t[1]))
    return [u for _, _, u in timed]


def _flight_updates(
    flight: Flight, cancelled: bool, delayed: bool, profile: FeedProfile, rng: random.Random
) -> list[FlightStatusUpdated]:
    out: list[FlightStatusUpdated] = []
    dep, arr = flight.departure, flight.arrival

    def add(status: str, at: int, est_dep: int | None = None, gate: str | None = None, reason: str = "") -> None:
        shift = (est_dep - dep) if est_dep is not None else 0
        out.append(
            FlightStatusUpdated(
                flight_id=flight.flight_id,
                number=flight.number,
                origin=flight.origin,
                destination=flight.destination,
                scheduled_departure=dep,
                scheduled_arrival=arr,
                status=status,  # type: ignore[arg-type]
                seq=len(out) + 1,
                observed_at=at,
                estimated_departure=est_dep if est_dep is not None else dep,
                estimated_arrival=arr + shift,
                gate=gate,
                reason=reason,
            )
        )

    gate = f"{rng.choice('ABCD')}{rng.randrange(1, 40)}"
    add("scheduled", dep - 4 * 3600, gate=gate)
    if cancelled:
        add("cancelled", dep - rng.randrange(30, 180) * _MIN, reason=rng.choice(("technical", "crew", "weather")))
        return out
    est = dep
    if delayed:
        minutes = rng.randrange(190, 420) if rng.random() < profile.long_delays else rng.randrange(20, 170)
        est = dep + minutes * _MIN
        reason = rng.choice(("late inbound aircraft", "technical", "air traffic control", "weather"))
        add("delayed", dep - rng.randrange(60, 150) * _MIN, est_dep=est, gate=gate, reason=reason)
        if rng.random() < profile.reduced:
            est = dep + max(10, minutes - rng.randrange(10, 90)) * _MIN
            add("delayed", dep - rng.randrange(10, 50) * _MIN, est_dep=est, gate=gate, reason="delay reduced")
    if rng.random() < profile.gate_changes:
        gate = f"{rng.choice('ABCD')}{rng.randrange(1, 40)}"
        add("gate_changed", est - 70 * _MIN, est_dep=est, gate=gate)
    add("boarding", est - 40 * _MIN, est_dep=est, gate=gate)
    add("departed", est + rng.randrange(0, 8) * _MIN, est_dep=est, gate=gate)
    add("arrived", arr + (est - dep) + rng.randrange(-10, 10) * _MIN, est_dep=est, gate=gate)
    # keep observation times increasing within the flight
    for k in range(1, len(out)):
        if out[k].observed_at <= out[k - 1].observed_at:
            out[k] = _at(out[k], out[k - 1].observed_at + 1)
    return out


def _at(update: FlightStatusUpdated, at: int) -> FlightStatusUpdated:
    return msgspec.structs.replace(update, observed_at=at)


async def publish_feed(
    bus: Bus,
    updates: list[FlightStatusUpdated],
    *,
    speed: float = 0.0,
    sender: str = "status-feed",
    on_published: Callable[[FlightStatusUpdated], Awaitable[None] | None] | None = None,
    ids: str | None = None,
    window: int = 128,
) -> int:
    """Publish ``updates`` in order; ``speed`` simulated seconds per real second (0: as fast as possible).

    The feed is stored in a stream: up to ``window`` publishes wait for their acknowledgement
    at once (in order on the connection). ``ids``: message ids ``<ids>.<index>``, so a feed
    played again (a restarted feed process) is stored once (JetStream de-duplication).
    """
    if not updates:
        return 0
    start_sim = updates[0].observed_at
    start_real = time.monotonic()
    in_flight: set[asyncio.Task[object]] = set()
    try:
        for i, update in enumerate(updates):
            if speed > 0:
                due = start_real + (update.observed_at - start_sim) / speed
                delay = due - time.monotonic()
                if delay > 0.002:
                    await asyncio.sleep(delay)  # pacing of the simulated clock, not synchronisation
            msg_id = f"{ids}.{i}" if ids else None
            if i == 0 or len(in_flight) >= window:  # the first one alone: it makes sure of the stream
                await bus.publish(update, sender=sender, msg_id=msg_id)
                if in_flight:
                    await _settle(in_flight)
            else:
                in_flight.add(asyncio.ensure_future(bus.publish(update, sender=sender, msg_id=msg_id)))
            if on_published is not None:
                result = on_published(update)
                if result is not None:
                    await result
            if i % 512 == 511:
                await asyncio.sleep(0)  # let the agents in this process run
        await _settle(in_flight)
    finally:
        for task in in_flight:
            task.cancel()
    await bus.flush()
    return len(updates)


async def _settle(tasks: set[asyncio.Task[object]]) -> None:
    """Wait for every publish in ``tasks``; the first failure is raised."""
    await asyncio.gather(*tasks)
    tasks.clear()


class StatusFeed(Agent):
    """Plays the seeded day's status feed once (``busagents run flight-feed``), then idles.

    The day and the pace come from ``BUSAGENTS_FLIGHT_*`` (``flights``, ``passengers``,
    ``seed``, ``day_seconds``), so it matches the other agents' view of the day.
    """

    name = "flight-feed"
    produces = (FlightStatusUpdated,)
    #: Agent types that must be serving before the first update is published (core NATS keeps
    #: no message for a consumer that is not listening yet).
    waits_for: tuple[str, ...] = ("flight-monitor", "flight-context")

    def __init__(self, day: AirlineDay | None = None, day_seconds: float | None = None) -> None:
        settings = FlightSettings()
        self.day = day if day is not None else generate(settings.flights, settings.passengers, settings.seed)
        self.day_seconds = settings.day_seconds if day_seconds is None else day_seconds
        self.published = 0

    async def run(self, ctx: Context) -> None:
        try:
            await ctx.bus.wait_for_agents(self.waits_for, timeout=60)
        except TimeoutError as exc:
            ctx.log.warning("playing the feed anyway: %s", exc)
        updates = status_feed(self.day)
        span = updates[-1].observed_at - updates[0].observed_at if updates else 0
        speed = span / self.day_seconds if self.day_seconds > 0 and span > 0 else 0.0
        ids = f"feed.{len(self.day.flights)}.{self.day.passenger_count}.{self.day.seed}"
        self.published = await publish_feed(ctx.bus, updates, speed=speed, sender=self.name, ids=ids)
        ctx.log.info("status feed played: %d updates", self.published)
