"""Testing kit: a real nats-server per test session, agents run in-process, typed waits.

Enable it in ``conftest.py``::

    pytest_plugins = ["busagents.testing"]

then::

    async def test_rebooks(bus):
        async with run_agents(bus, Rebooker()):
            async with bus.expect(BookingChanged, where=lambda m: m.booking_id == "B1") as got:
                await bus.publish(RebookPassenger(booking_id="B1", flight_id="BA117"))
        assert got.message.body.flight_id == "BA117"

Never a server that happens to be running already: each session starts its own
on a free loopback port, with JetStream in a temporary directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio

from .agent import Agent
from .bus import Bus
from .server import NatsServer
from .worker import Worker

__all__ = ["bus", "delete_streams", "nats_server", "run_agents"]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A real nats-server with JetStream, started for this test session."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A bus connected to the session's nats-server, closed after the test.

    JetStream streams (durable contracts, dead letters, KV buckets) are deleted after the
    test, so stored messages never leak into the next test's durable consumers.
    """
    connected = await Bus.connect(nats_server.url, name="busagents-test")
    try:
        yield connected
    finally:
        await delete_streams(connected)
        await connected.close()


async def delete_streams(bus: Bus) -> None:
    """Delete every JetStream stream (and so its consumers) on the bus's server: a clean slate between tests."""
    try:
        for name in await bus.js.streams_info():
            await bus.js.delete_stream(name.config.name or "")
    except (nats.errors.Error, nats.js.errors.Error):
        pass  # no JetStream, or the connection is gone: nothing to clean


@asynccontextmanager
async def run_agents(bus: Bus, *agents: Agent, drain_timeout: float = 10.0) -> AsyncIterator[Worker]:
    """Run ``agents`` in this process on ``bus`` until the block ends, then drain them.

    A start that fails raises here with nothing left running (see :meth:`Worker.start`).
    """
    async with Worker(agents, bus, drain_timeout=drain_timeout) as worker:
        yield worker
