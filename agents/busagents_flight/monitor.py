"""The flight monitor: per-flight state over a noisy status feed; emits only disruptions that matter.

A disruption is a cancellation, a delay beyond the rebooking threshold, or a
delay that breaks a passenger's connection (arrival + the airport's minimum
connection time after the onward flight's departure). Repeated and stale
updates (``seq`` not newer than the last seen) change nothing, so they never
create a second disruption; a delay that is later reduced does not either.
A rebooking that lands on a flight cancelled meanwhile (the decision raced the
cancellation) is reported as a cancellation for that booking only.

Replicable and restartable: the per-flight state lives in the agent-state bucket
``flight-monitor`` (JetStream KV), not in the process. The status feed's stream is
partitioned by flight and each partition has one update in flight across all
replicas, so one flight's updates are handled one at a time, in feed order, by
whichever replica pulls them; each reads the flight's state, writes back the new
state with compare-and-set, *with the disruption it reveals recorded in it*, then
announces the disruption and clears it from the state. A disruption's id comes
from the update that caused it (``<flight>#<seq>``) and its message id from the
disruption id, so a replica that dies between the steps leaves the disruption in
the state and the next update of that flight (or the redelivery) announces it; if
it was announced already, JetStream drops the copy: none is announced twice, none
is lost. Recording a cancellation before announcing it closes a race with a
rebooking onto that flight: whoever sees the booking change after the record
(:meth:`FlightMonitor.moved`) reports it, and the reasoner asking the context
after the announcement finds the booking there.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from busagents_travel import BookingChanged, FlightCancelled, FlightDelayed, FlightStatusUpdated, OnwardConnections

from busagents import Agent, Context, State, StateConflictError, on

from .settings import FlightSettings

__all__ = ["BUCKET", "FlightMonitor", "FlightWatch"]

#: The agent-state bucket of the monitor's per-flight state.
BUCKET = "flight-monitor"
#: Below this delay no connection can break, so the monitor does not even ask.
_CONNECTION_CHECK_MINUTES = 10
#: A flight already reported as long-delayed is reported again only when the delay grows this much.
_REPORT_AGAIN_MINUTES = 120


class FlightWatch(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the monitor knows of one flight (the value of its key in the state bucket)."""

    seq: int = 0  # the newest update applied
    cancelled: FlightStatusUpdated | None = None  # the update that cancelled the flight
    delay_minutes: int = 0
    reported_delay: int = 0  # largest delay reported as a long delay
    missed: list[str] = []  # onward flights already reported as missed
    #: A disruption recorded but not yet announced (one of the two; a union of structs needs tags).
    delayed: FlightDelayed | None = None
    cancelling: FlightCancelled | None = None


class FlightMonitor(Agent):
    """Watches ``FlightStatusUpdated``; publishes ``FlightDelayed`` / ``FlightCancelled``."""

    name = "flight-monitor"
    produces = (FlightDelayed, FlightCancelled, OnwardConnections)
    state_buckets = (BUCKET,)
    max_concurrency = 8

    def __init__(self, rebook_threshold_minutes: int | None = None) -> None:
        if rebook_threshold_minutes is None:
            rebook_threshold_minutes = FlightSettings().rebook_threshold_minutes
        self.threshold = rebook_threshold_minutes
        self.updates = 0  # updates handled by this replica, stale ones included
        self.ignored = 0  # repeated or out-of-order updates
        self.disruptions = 0  # disruptions this replica published
        self.conflicts = 0  # state writes that lost a compare-and-set (another replica wrote first)
        self._progress = asyncio.Condition()

    @on(FlightStatusUpdated)
    async def watch(self, update: FlightStatusUpdated, ctx: Context) -> None:
        watches = await ctx.state(BUCKET, FlightWatch)
        try:
            while True:
                entry = await watches.entry(update.flight_id)
                state = entry.value if entry is not None else FlightWatch()
                if state.delayed is not None or state.cancelling is not None:
                    # recorded by a replica that died before it could announce it: announce it now
                    await self._announce(watches, update.flight_id, state, entry.revision if entry else 0, ctx)
                    continue
                if update.seq <= state.seq or state.cancelled is not None:
                    self.ignored += 1
                    return
                disruption = await self._update(state, update, ctx)
                if isinstance(disruption, FlightDelayed):
                    state.delayed = disruption
                elif isinstance(disruption, FlightCancelled):
                    state.cancelling = disruption
                try:  # first the state (a cancellation is known before it is announced), then the news
                    if entry is None:
                        revision = await watches.create(update.flight_id, state)
                    else:
                        revision = await watches.update(update.flight_id, state, revision=entry.revision)
                except StateConflictError:
                    self.conflicts += 1  # a redelivered update raced its first delivery: read again
                    continue
                if disruption is not None:
                    await self._announce(watches, update.flight_id, state, revision, ctx)
                return
        finally:
            self.updates += 1
            async with self._progress:
                self._progress.notify_all()

    async def _announce(
        self, watches: State[FlightWatch], flight_id: str, state: FlightWatch, revision: int, ctx: Context
    ) -> None:
        """Publish the disruption recorded in ``state``, then clear it there.

        Its message id comes from the disruption id, so announcing it again (after a crash
        between the two steps) is stored once.
        """
        disruption = state.delayed or state.cancelling
        assert disruption is not None
        await ctx.publish(disruption, msg_id=f"disruption.{disruption.disruption_id}")
        self.disruptions += 1
        ctx.log.info("disruption %s", disruption)
        state.delayed = state.cancelling = None
        with contextlib.suppress(StateConflictError):  # another replica announced and cleared it meanwhile
            await watches.update(flight_id, state, revision=revision)

    async def _update(
        self, state: FlightWatch, u: FlightStatusUpdated, ctx: Context
    ) -> FlightDelayed | FlightCancelled | None:
        """Apply ``u`` to ``state`` (in place); the disruption it reveals, if any."""
        state.seq = u.seq
        if u.status == "cancelled":
            state.cancelled = u
            return _disruption(FlightCancelled, u, f"{u.flight_id}#{u.seq}", reason=u.reason)
        if u.estimated_departure is None or u.status in ("departed", "arrived"):
            return None  # a delay is decided before departure; later updates only confirm it
        delay = max(0, (u.estimated_departure - u.scheduled_departure) // 60)
        state.delay_minutes = delay
        if delay < _CONNECTION_CHECK_MINUTES:
            return None
        long_delay = delay >= self.threshold and (
            state.reported_delay == 0 or delay >= state.reported_delay + _REPORT_AGAIN_MINUTES
        )
        missed = await self._missed_connections(u, ctx)
        new_missed = sorted(missed - set(state.missed))
        if not long_delay and not new_missed:
            return None
        state.missed = sorted({*state.missed, *new_missed})
        if long_delay:
            state.reported_delay = delay
        return _disruption(
            FlightDelayed,
            u,
            f"{u.flight_id}#{u.seq}",
            delay_minutes=delay,
            estimated_departure=u.estimated_departure,
            estimated_arrival=u.estimated_arrival or u.scheduled_arrival + delay * 60,
            missed_connections=new_missed,
            long_delay=long_delay,
        )

    @on(BookingChanged)
    async def moved(self, change: BookingChanged, ctx: Context) -> None:
        """A rebooking that lands on a flight cancelled meanwhile is a disruption for that booking."""
        if not change.new_legs:
            return
        watches = await ctx.state(BUCKET, FlightWatch)
        for leg in change.new_legs:
            state = await watches.get(leg.flight_id)
            if state is None or state.cancelled is None:
                continue
            u = state.cancelled
            disruption_id = f"{u.flight_id}#{u.seq}/{change.booking_id}@{change.version}"
            await ctx.publish(
                _disruption(FlightCancelled, u, disruption_id, reason=u.reason, bookings=[change.booking_id])
            )
            self.disruptions += 1

    async def _missed_connections(self, u: FlightStatusUpdated, ctx: Context) -> set[str]:
        reply = await ctx.request(OnwardConnections(flight_id=u.flight_id))
        arrival = u.estimated_arrival or u.scheduled_arrival
        ready = arrival + reply.mct_minutes * 60
        return {c.flight_id for c in reply.connections if c.departure < ready}

    async def wait_handled(self, count: int, timeout: float) -> None:
        """Wait until this monitor handled ``count`` status updates (for the in-process demo and tests)."""

        async def reached() -> None:
            async with self._progress:
                await self._progress.wait_for(lambda: self.updates >= count)

        await asyncio.wait_for(reached(), timeout)


def _disruption(
    kind: type[FlightDelayed | FlightCancelled], u: FlightStatusUpdated, disruption_id: str, **fields: object
) -> FlightDelayed | FlightCancelled:
    return kind(
        disruption_id=disruption_id,
        flight_id=u.flight_id,
        number=u.number,
        origin=u.origin,
        destination=u.destination,
        observed_at=u.observed_at,
        **fields,  # type: ignore[arg-type]
    )
