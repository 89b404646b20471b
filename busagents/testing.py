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

import logging
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

log = logging.getLogger("busagents.testing")

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


async def delete_streams(bus: Bus, attempts: int = 3) -> None:
    """Delete every JetStream stream (and so its consumers) on the bus's server: a clean slate between tests.

    A busy server may time an API request out: tried again (``attempts`` in all), so that a stream
    does not outlive its test and feed the next one's consumers; a server without JetStream, or
    a closed connection, has nothing to clean.
    """
    for attempt in range(attempts):
        try:
            for name in await bus.js.streams_info():
                await bus.js.delete_stream(name.config.name or "")
            return
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            return  # no JetStream
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError):
            return
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            if attempt + 1 == attempts:
                log.warning("could not delete the test streams: %r", exc)


@asynccontextmanager
async def run_agents(bus: Bus, *agents: Agent, drain_timeout: float = 10.0) -> AsyncIterator[Worker]:
    """Run ``agents`` in this process on ``bus`` until the block ends, then drain them.

    A start that fails raises here with nothing left running (see :meth:`Worker.start`).
    """
    async with Worker(agents, bus, drain_timeout=drain_timeout) as worker:
        yield worker
