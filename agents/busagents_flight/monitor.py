"""The flight monitor: per-flight state over a noisy status feed; emits only disruptions that matter.

A disruption is a cancellation, a delay beyond the rebooking threshold, or a
delay that breaks a passenger's connection (arrival + the airport's minimum
connection time after the onward flight's departure). Repeated and stale
updates (``seq`` not newer than the last seen) change nothing, so they never
create a second disruption; a delay that is later reduced does not either.
A rebooking that lands on a flight cancelled meanwhile (the decision raced the
cancellation) is reported as a cancellation for that booking only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from busagents_travel import BookingChanged, FlightCancelled, FlightDelayed, FlightStatusUpdated, OnwardConnections

from busagents import Agent, Context, on

from .settings import FlightSettings

__all__ = ["FlightMonitor"]

#: Below this delay no connection can break, so the monitor does not even ask.
_CONNECTION_CHECK_MINUTES = 10
#: A flight already reported as long-delayed is reported again only when the delay grows this much.
_REPORT_AGAIN_MINUTES = 120


@dataclass(slots=True)
class _FlightState:
    seq: int = 0
    cancelled: FlightStatusUpdated | None = None  # the update that cancelled the flight
    delay_minutes: int = 0
    reported_delay: int = 0  # largest delay reported as a long delay
    missed: set[str] = field(default_factory=set)  # onward flights already reported as missed
    disruptions: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class FlightMonitor(Agent):
    """Watches ``FlightStatusUpdated``; publishes ``FlightDelayed`` / ``FlightCancelled``."""

    name = "flight-monitor"
    produces = (FlightDelayed, FlightCancelled, OnwardConnections)
    max_concurrency = 8

    def __init__(self, rebook_threshold_minutes: int | None = None) -> None:
        if rebook_threshold_minutes is None:
            rebook_threshold_minutes = FlightSettings().rebook_threshold_minutes
        self.threshold = rebook_threshold_minutes
        self.flights: dict[str, _FlightState] = {}
        self.updates = 0  # updates handled, stale ones included
        self.ignored = 0  # repeated or out-of-order updates
        self.disruptions = 0
        self._progress = asyncio.Condition()

    @on(FlightStatusUpdated)
    async def watch(self, update: FlightStatusUpdated, ctx: Context) -> None:
        state = self.flights.get(update.flight_id)
        if state is None:
            state = self.flights[update.flight_id] = _FlightState()
        try:
            async with state.lock:  # one update of a flight at a time, in arrival order
                await self._update(state, update, ctx)
        finally:
            self.updates += 1
            async with self._progress:
                self._progress.notify_all()

    async def _update(self, state: _FlightState, u: FlightStatusUpdated, ctx: Context) -> None:
        if u.seq <= state.seq or state.cancelled is not None:
            self.ignored += 1
            return
        state.seq = u.seq
        if u.status == "cancelled":
            state.cancelled = u
            await self._emit(state, ctx, FlightCancelled, u, reason=u.reason)
            return
        if u.estimated_departure is None or u.status in ("departed", "arrived"):
            return  # a delay is decided before departure; later updates only confirm it
        delay = max(0, (u.estimated_departure - u.scheduled_departure) // 60)
        state.delay_minutes = delay
        if delay < _CONNECTION_CHECK_MINUTES:
            return
        long_delay = delay >= self.threshold and (
            state.reported_delay == 0 or delay >= state.reported_delay + _REPORT_AGAIN_MINUTES
        )
        missed = await self._missed_connections(u, ctx)
        new_missed = sorted(missed - state.missed)
        if not long_delay and not new_missed:
            return
        state.missed.update(new_missed)
        if long_delay:
            state.reported_delay = delay
        await self._emit(
            state,
            ctx,
            FlightDelayed,
            u,
            delay_minutes=delay,
            estimated_departure=u.estimated_departure,
            estimated_arrival=u.estimated_arrival or u.scheduled_arrival + delay * 60,
            missed_connections=new_missed,
            long_delay=long_delay,
        )

    @on(BookingChanged)
    async def moved(self, change: BookingChanged, ctx: Context) -> None:
        """A rebooking that lands on a flight cancelled meanwhile is a disruption for that booking."""
        for leg in change.new_legs:
            state = self.flights.get(leg.flight_id)
            if state is None or state.cancelled is None:
                continue
            async with state.lock:
                u = state.cancelled
                await self._emit(state, ctx, FlightCancelled, u, reason=u.reason, bookings=[change.booking_id])

    async def _missed_connections(self, u: FlightStatusUpdated, ctx: Context) -> set[str]:
        reply = await ctx.request(OnwardConnections(flight_id=u.flight_id))
        arrival = u.estimated_arrival or u.scheduled_arrival
        ready = arrival + reply.mct_minutes * 60
        return {c.flight_id for c in reply.connections if c.departure < ready}

    async def _emit(
        self,
        state: _FlightState,
        ctx: Context,
        kind: type[FlightDelayed | FlightCancelled],
        u: FlightStatusUpdated,
        **fields: object,
    ) -> None:
        state.disruptions += 1
        disruption = kind(
            disruption_id=f"{u.flight_id}#{state.disruptions}",
            flight_id=u.flight_id,
            number=u.number,
            origin=u.origin,
            destination=u.destination,
            observed_at=u.observed_at,
            **fields,  # type: ignore[arg-type]
        )
        await ctx.publish(disruption)
        self.disruptions += 1
        ctx.log.info("disruption %s", disruption)

    async def wait_handled(self, count: int, timeout: float) -> None:
        """Wait until this monitor handled ``count`` status updates (for the in-process demo and tests)."""

        async def reached() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: self.updates >= count)

        await asyncio.wait_for(reached(), timeout)
