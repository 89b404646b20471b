"""The flight assistant's durable path for the fault tests: RebookPassenger -> the real rebooker -> its store.

10,000 decisions (rebooks onto free seats where the day has them, refunds otherwise), each
a change of one booking: applied once, the booking's version goes from 0 to 1. The tests
count booking changes in the rebooker's SQLite store, never log lines.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from busagents_flight.data import AirlineDay, generate
from busagents_flight.store import SqliteStore
from busagents_flight.view import LiveView
from busagents_travel import Disruption, Leg, RebookPassenger

from busagents import Bus

#: The seeded day the rebooker process generates too (same settings through the environment).
FLIGHTS, PASSENGERS, SEED = 160, 16_000, 3
STREAM, CONSUMER = "BA_RebookPassenger", "flight-rebooker"


@functools.cache
def day() -> AirlineDay:
    return generate(FLIGHTS, PASSENGERS, SEED)


def decisions(n: int) -> list[RebookPassenger]:
    """``n`` valid decisions on ``n`` different bookings: single travellers moved to a free seat of
    another flight on the same route and cabin while seats last (about half), refunds for the others."""
    d = day()
    if len(d.bookings) < n:
        raise ValueError(f"the day has {len(d.bookings)} bookings, fewer than {n}")
    view = LiveView(d)
    by_route: dict[tuple[str, str], list[str]] = {}
    for f in d.flights:
        by_route.setdefault((f.origin, f.destination), []).append(f.flight_id)
    free = {f.flight_id: list(view.free_seats(f.flight_id)) for f in d.flights}
    flights = {f.flight_id: f for f in d.flights}
    out: list[RebookPassenger] = []
    for booking in d.bookings[:n]:
        leg = booking.legs[0]
        disruption = Disruption(
            disruption_id=f"{leg.flight_id}#fault",
            kind="cancelled",
            flight_id=leg.flight_id,
            number=leg.number,
            origin=leg.origin,
            destination=leg.destination,
            observed_at=leg.departure - 3600,
        )
        pids = [p.passenger_id for p in booking.passengers]
        new_leg = None
        if len(pids) == 1:
            for other in by_route[(leg.origin, leg.destination)]:
                seat = next((s for s in free[other] if s.cabin == leg.cabin), None)
                if other != leg.flight_id and seat is not None:
                    free[other].remove(seat)
                    f = flights[other]
                    new_leg = Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, leg.cabin,
                                  [seat.number])  # fmt: skip
                    break
        decision_id = f"fault/{booking.booking_id}"
        if new_leg is not None:
            out.append(RebookPassenger(decision_id=decision_id, disruption=disruption, booking_id=booking.booking_id,
                                       action="rebook", passenger_ids=pids, replaces=[leg.flight_id],
                                       new_legs=[new_leg]))  # fmt: skip
        else:
            out.append(RebookPassenger(decision_id=decision_id, disruption=disruption, booking_id=booking.booking_id,
                                       action="refund", passenger_ids=pids))  # fmt: skip
    return out


async def load_store(path: str) -> None:
    """The rebooker's store at the start of the day."""
    store = SqliteStore(path)
    await store.open()
    await store.load(day().bookings)
    await store.close()


def count_changes(path: str) -> tuple[int, int, int]:
    """(bookings changed once, bookings changed more than once, decisions recorded) in the store."""
    db = sqlite3.connect(path, timeout=30.0)
    try:
        once = db.execute("SELECT COUNT(*) FROM bookings WHERE version = 1").fetchone()[0]
        more = db.execute("SELECT COUNT(*) FROM bookings WHERE version > 1").fetchone()[0]
        recorded = db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
        return int(once), int(more), int(recorded)
    finally:
        db.close()


async def seat_conflicts(path: str) -> int:
    store = SqliteStore(path)
    await store.open()
    try:
        return await store.seat_conflicts()
    finally:
        await store.close()


def spawn_rebooker(url: str, store_path: str, **env: str) -> subprocess.Popen[bytes]:
    """The real rebooker as its own OS process: ``busagents run flight-rebooker``."""
    full_env = {
        **os.environ,
        "BUSAGENTS_FLIGHT_STORE": store_path,
        "BUSAGENTS_FLIGHT_FLIGHTS": str(FLIGHTS),
        "BUSAGENTS_FLIGHT_PASSENGERS": str(PASSENGERS),
        "BUSAGENTS_FLIGHT_SEED": str(SEED),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0",
        **env,
    }
    cmd = [sys.executable, "-m", "busagents", "--log-level", "ERROR", "run", "flight-rebooker", "--nats", url]
    return subprocess.Popen(cmd, env=full_env, cwd=Path(store_path).parent, stdin=subprocess.DEVNULL)


async def publish_decisions(bus: Bus, batch: Sequence[RebookPassenger], *, concurrency: int = 128) -> None:
    """Publish each decision durably (stream ack), ``concurrency`` at a time."""
    it = iter(batch)

    async def sender() -> None:
        for decision in it:
            await bus.publish(decision)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
