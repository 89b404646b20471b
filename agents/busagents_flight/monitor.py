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
whichever replica pulls them. An update that reveals a disruption is written to the
flight's state with compare-and-set, *with the disruption recorded in it*; then the
disruption is announced and cleared from the state. Updates that reveal nothing (most
of them) write nothing: each replica keeps a copy of the states it read or wrote, with
their revisions, and moves its copy on; a flight it has not seen yet starts from an empty
copy, without a read. A copy can only be behind the bucket (states only grow: a later
seq, a larger reported delay, more missed connections, a cancellation), and a copy that
is behind reveals at least what the bucket would, so a disruption is never missed;
writing it from a copy that is behind fails the compare-and-set, and the replica reads
the bucket and decides again. So the bucket is read only where a disruption is at stake,
and a flight's updates may go to any replica at no cost. A disruption's id comes
from the update that caused it (``<flight>#<seq>``) and its message id from the
disruption id, so a replica that dies between the steps leaves the disruption in
the state and the next update of that flight (or the redelivery) announces it; if
it was announced already, JetStream drops the copy: none is announced twice, none
is lost. A rebooking that lands on a cancelled flight is found without a read:
every replica reads every announced cancellation (a view of ``FlightCancelled``),
and the replica handling the booking change (:meth:`FlightMonitor.moved`) first
catches that view up with its stream. A cancellation announced before then is
known and reported for that booking; one announced after is the reasoner's to
handle, and the reasoner, asking the context who is on the flight after the
announcement, finds the booking there (its change was stored before).
"""

from __future__ import annotations

import asyncio
from collections.abc import Set as AbstractSet

import msgspec
from busagents_travel import BookingsChanged, FlightCancelled, FlightDelayed, FlightStatusUpdated, OnwardConnections

from busagents import Agent, Context, State, StateConflictError, on

from .settings import FlightSettings

__all__ = ["BUCKET", "FlightMonitor", "FlightWatch"]

#: The agent-state bucket of the monitor's per-flight state.
BUCKET = "flight-monitor"
#: Below this delay no connection can break, so the monitor does not even ask.
_CONNECTION_CHECK_MINUTES = 10
#: A flight already reported as long-delayed is reported again only when the delay grows this much.
_REPORT_AGAIN_MINUTES = 120


class _Landed(msgspec.Struct):
    flight_id: str


class _Move(msgspec.Struct):
    booking_id: str
    action: str
    new_legs: list[_Landed]
    version: int = 0


class _Moves(msgspec.Struct):
    """What :meth:`FlightMonitor.moved` reads of a ``BookingsChanged``: where each booking landed."""

    changes: list[_Move]


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
        self.disruptions = 0  # distinct disruptions this replica published
        self._published: set[str] = set()  # their ids: a second publish (JetStream drops it) counts once
        self.conflicts = 0  # state writes that lost a compare-and-set (another replica wrote first)
        #: This replica's copy of each flight's state, with the bucket revision it was read or written
        #: at (0: no key yet). Updates that reveal nothing only move the copy on; a write starts
        #: from it and fails (compare-and-set) if the bucket moved meanwhile.
        self._known: dict[str, tuple[FlightWatch, int]] = {}
        #: Flights known cancelled (that is final), with their announcement: this replica's own, and every
        #: replica's through the view of ``FlightCancelled``.
        self._cancelled: dict[str, FlightCancelled] = {}
        self._progress = asyncio.Condition()

    @on(FlightStatusUpdated)
    async def watch(self, update: FlightStatusUpdated, ctx: Context) -> None:
        watches = await ctx.state(BUCKET, FlightWatch)
        fid = update.flight_id
        try:
            while True:
                if fid in self._cancelled:  # final: nothing after a cancellation changes anything
                    self.ignored += 1
                    return
                known = self._known.get(fid)
                if known is None:
                    # no read: a copy behind the bucket reveals at least what the bucket would, and
                    # writing from it fails the compare-and-set, which reads (see the module doc)
                    known = self._known[fid] = (FlightWatch(), 0)
                state, revision = msgspec.structs.replace(known[0]), known[1]
                if state.delayed is not None or state.cancelling is not None:
                    # recorded by a replica that died before it could announce it: announce it now
                    await self._announce(watches, fid, state, revision, ctx)
                    continue
                if update.seq <= state.seq or state.cancelled is not None:
                    self.ignored += 1
                    return
                disruption = await self._update(state, update, ctx)
                if disruption is None:  # nothing to record: the copy moves on, the bucket does not
                    if update.status == "arrived":
                        self._known.pop(fid, None)  # the flight is over: keep no copy (a late update reads)
                    else:
                        self._known[fid] = (state, revision)
                    return
                if isinstance(disruption, FlightDelayed):
                    state.delayed = disruption
                else:
                    state.cancelling = disruption
                try:  # first the state (a cancellation is known before it is announced), then the news
                    if revision == 0:
                        revision = await watches.create(fid, state)
                    else:
                        revision = await watches.update(fid, state, revision=revision)
                except StateConflictError:
                    # another replica wrote meanwhile (or a redelivered update raced its first
                    # delivery, or this replica never read the flight): its copy is behind; read
                    # the bucket and decide again
                    self.conflicts += 1
                    entry = await watches.entry(fid)
                    self._known[fid] = (entry.value, entry.revision) if entry is not None else (FlightWatch(), 0)
                    continue
                await self._announce(watches, fid, state, revision, ctx)
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
        self._count(disruption.disruption_id)
        ctx.log.info("disruption %s", disruption)
        state.delayed = state.cancelling = None
        try:
            revision = await watches.update(flight_id, state, revision=revision)
        except StateConflictError:  # another replica announced and cleared it meanwhile
            self._known.pop(flight_id, None)
            return
        if isinstance(disruption, FlightCancelled):  # final: later updates of the flight are ignored
            self._cancelled.setdefault(flight_id, disruption)
            self._known.pop(flight_id, None)
        else:
            self._known[flight_id] = (state, revision)

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

    @on(BookingsChanged, read_as=_Moves)
    async def moved(self, changed: _Moves, ctx: Context) -> None:
        """A rebooking that lands on a flight cancelled meanwhile is a disruption for that booking.

        Only a rebooking lands anywhere. A keep reports the legs the booking has (so does a decision
        that came after the booking had moved for another disruption): on a cancelled flight they are
        the cancellation's to decide (everyone on the flight), or the landing of the rebooking that put
        them there, announced already under the same id (JetStream dropped the copy; core subscribers
        such as the demo's tally saw it twice).
        """
        moves = [change for change in changed.changes if change.action == "rebook"]
        landed = {leg.flight_id for change in moves for leg in change.new_legs}
        if not landed:
            return
        cancelled = await self._cancellations(landed, ctx)
        for change in moves:
            for leg in change.new_legs:
                c = cancelled.get(leg.flight_id)
                if c is None:
                    continue
                base = c.disruption_id.partition("/")[0]  # the cancellation's own id: "<flight>#<seq>"
                disruption_id = f"{base}/{change.booking_id}@{change.version}"
                await ctx.publish(
                    msgspec.structs.replace(c, disruption_id=disruption_id, bookings=[change.booking_id]),
                    msg_id=f"disruption.{disruption_id}",
                )
                self._count(disruption_id)  # a redelivered change publishes it again: stored once, counted once

    @on(FlightCancelled, view=True)
    async def cancelled(self, c: FlightCancelled, ctx: Context) -> None:
        """Every replica reads every announced cancellation: a rebooking onto one is caught without a read."""
        self._cancelled.setdefault(c.flight_id, c)

    @property
    def announced(self) -> AbstractSet[str]:
        """The ids of the disruptions this replica published (what :attr:`disruptions` counts)."""
        return self._published

    def _count(self, disruption_id: str) -> None:
        if disruption_id not in self._published:
            self._published.add(disruption_id)
            self.disruptions += 1

    async def _cancellations(self, flights: set[str], ctx: Context) -> dict[str, FlightCancelled]:
        """The cancelled ones of ``flights``, as announced until now: the view of ``FlightCancelled`` caught up
        with its stream first (a cancellation announced after this is the reasoner's to handle: it asks
        the context who is on the flight, and the booking changes stored before it asks are in the answer)."""
        if flights - self._cancelled.keys():
            await ctx.catch_up()
        return {fid: self._cancelled[fid] for fid in flights if fid in self._cancelled}

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
