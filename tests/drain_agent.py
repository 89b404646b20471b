"""An agent run as a real OS process by the drain, replicas and swarm tests (``busagents run drain_agent:Slow``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from busagents import Agent, Context, event, on


@event("test.drain.job")
class Job(msgspec.Struct):
    n: int


@event("test.drain.started")
class Started(msgspec.Struct):
    n: int


@event("test.drain.done")
class Done(msgspec.Struct):
    n: int


class Slow(Agent):
    name = "slow"
    produces = (Started, Done)

    @on(Job)
    async def work(self, job: Job, ctx: Context) -> Done:
        await ctx.publish(Started(n=job.n))
        await asyncio.sleep(1.0)  # simulated work that SIGTERM arrives in the middle of
        return Done(n=job.n)


def child_env() -> dict[str, str]:
    """The environment of a ``busagents`` child process that imports ``drain_agent`` and heartbeats fast."""
    return {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
    }
