"""The run-time contracts registry: workers write their schemas, withdraw them on drain, run without JetStream."""

from __future__ import annotations

import asyncio
import logging

import pytest

from busagents import Bus, json_schema
from busagents.registry import running_schemas
from busagents.server import NatsServer
from busagents.testing import run_agents
from busagents.worker import Worker

from .test_upcasters import Delayed, DelayedV1, DelayedV2, Seen, Watcher


async def _written(worker: Worker) -> None:
    """Wait until the worker's registry task ended."""
    (task,) = [t for t in worker._tasks if t.get_name() == "contracts-registry"]
    await asyncio.wait_for(asyncio.shield(task), 30)


async def test_a_worker_writes_the_schemas_its_agents_use_and_withdraws_them_on_drain(bus: Bus) -> None:
    async with run_agents(bus, Watcher()) as worker:
        await _written(worker)
        entries = await running_schemas(bus)
    by_version = {(e.contract, e.version): e for e in entries}
    assert set(by_version) == {("Delayed", 1), ("Delayed", 2), ("Delayed", 3), ("Seen", 1)}
    assert by_version[("Delayed", 3)].roles == ["consumes"]
    assert by_version[("Delayed", 1)].roles == by_version[("Delayed", 2)].roles == ["upcasts"]
    assert by_version[("Seen", 1)].roles == ["produces"]
    assert by_version[("Delayed", 1)].schema == json_schema(DelayedV1)
    assert by_version[("Delayed", 2)].schema == json_schema(DelayedV2)
    assert by_version[("Delayed", 3)].schema == json_schema(Delayed)
    assert by_version[("Seen", 1)].schema == json_schema(Seen)
    assert {e.agent for e in entries} == {"upcast-watcher"}
    assert {e.instance for e in entries} == {worker.services["upcast-watcher"].id}
    assert await running_schemas(bus) == []  # drained: withdrawn


async def test_an_agent_serves_without_jetstream_and_says_once_that_the_registry_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with NatsServer(jetstream=False) as server:
        bus = await Bus.connect(server.url, name="no-js")
        try:
            with caplog.at_level(logging.INFO, logger="busagents.registry"):
                async with run_agents(bus, Watcher()) as worker:
                    await _written(worker)
                    async with bus.expect(Seen, where=lambda s: s.flight_id == "NJ1") as seen:
                        await bus.publish(Delayed(flight_id="NJ1", delay_seconds=1))
        finally:
            await bus.close()
    assert seen.message.body.delay_seconds == 1
    said = [r for r in caplog.records if r.name == "busagents.registry"]
    assert len(said) == 1 and "not written to the busagents-contracts bucket" in said[0].getMessage()
