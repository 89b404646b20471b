"""The messages and agents the benchmarks run: a ~300-byte flight status event, a query, CPU work."""

from __future__ import annotations

import os
from typing import Any

import msgspec

from busagents import Agent, Context, command, event, on, query


@event("bench.flight.status", key="flight_id")
class FlightStatus(msgspec.Struct):
    """A flight's status as a monitor would publish it (about 300 bytes of JSON)."""

    flight_id: str
    airline: str
    origin: str
    destination: str
    scheduled_departure: str
    estimated_departure: str
    status: str
    delay_minutes: int
    gate: str
    terminal: str
    aircraft: str
    seats_sold: int
    remarks: str
    sequence: int


def flight_status(i: int) -> FlightStatus:
    """The i-th sample status: flights cycle over 100 ids, so subjects vary like a live feed."""
    return FlightStatus(
        flight_id=f"BA{100 + i % 100}",
        airline="British Airways",
        origin="LHR",
        destination="JFK",
        scheduled_departure="2026-11-25T14:35:00Z",
        estimated_departure="2026-11-25T15:20:00Z",
        status="delayed",
        delay_minutes=45,
        gate="B42",
        terminal="5",
        aircraft="Boeing 777-300ER G-STBA",
        seats_sold=297,
        remarks="Late inbound aircraft; crew on standby, catering re-loaded, boarding from 14:50 at gate B42.",
        sequence=i,
    )


@event("bench.durable.status", key="flight_id", durable=True)
class DurableStatus(FlightStatus):
    """The same status on a JetStream stream (``BA_DurableStatus``)."""


def durable_status(i: int) -> DurableStatus:
    return DurableStatus(**msgspec.structs.asdict(flight_status(i)))


def status_fields() -> dict[str, Any]:
    """The fields of FlightStatus, to build the equivalent pydantic model for FastStream."""
    return {name: (tp, ...) for name, tp in FlightStatus.__annotations__.items()}


class FlightLookup(msgspec.Struct):
    """Reply body of :class:`LookupFlight`."""

    status: FlightStatus


@query("bench.flight.lookup", reply=FlightLookup)
class LookupFlight(msgspec.Struct):
    flight_id: str


@command("bench.crunch")
class Crunch(msgspec.Struct):
    """CPU-bound work: ``work`` iterations of pure Python arithmetic."""

    job: int
    work: int


@event("bench.crunched")
class Crunched(msgspec.Struct):
    job: int
    pid: int


@event("bench.ready")
class ReplicaReady(msgspec.Struct):
    """Published by a benchmark agent process once its handlers are subscribed."""

    agent: str
    pid: int


def crunch(work: int) -> int:
    """Pure-Python CPU work that holds the GIL, like a handler that parses or scores in Python."""
    x = 0
    for i in range(work):
        x = (x * 31 + i) % 1_000_003
    return x


class Cruncher(Agent):
    """A CPU-bound command handler, run as 1 or 2 replica processes by ``busagents run --replicas``."""

    name = "bench-cruncher"
    produces = (Crunched, ReplicaReady)
    max_concurrency = 1

    async def run(self, ctx: Context) -> None:
        await ctx.publish(ReplicaReady(agent=self.name, pid=os.getpid()))

    @on(Crunch)
    async def crunch(self, cmd: Crunch, ctx: Context) -> Crunched:
        crunch(cmd.work)
        return Crunched(job=cmd.job, pid=os.getpid())


class Idler(Agent):
    """A typical small agent (one event handler, one query handler), measured while idle."""

    name = "bench-idler"
    produces = (ReplicaReady,)

    async def run(self, ctx: Context) -> None:
        await ctx.publish(ReplicaReady(agent=self.name, pid=os.getpid()))

    @on(FlightStatus)
    async def seen(self, status: FlightStatus, ctx: Context) -> None:
        return None

    @on(LookupFlight)
    async def lookup(self, q: LookupFlight, ctx: Context) -> FlightLookup:
        return FlightLookup(status=flight_status(0))
