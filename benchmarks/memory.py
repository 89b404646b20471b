"""Idle memory of one agent process started by ``busagents run``."""

from __future__ import annotations

import asyncio
from statistics import median

import psutil

from busagents import Bus

from .contracts import ReplicaReady
from .proc import spawn
from .report import Check, Result

NAME = "Idle memory"
AGENT = "benchmarks.contracts:Idler"

METHOD = """\
**Idle memory.** `busagents run {agent}` (one process: an agent with an event handler
and a query handler, connected, subscribed, heartbeats on) is started; once it announced
itself the benchmark waits {settle:.0f} s and reads its resident set size (RSS, from
`psutil`). For reference, the same is measured for a bare nats-py process with one
subscription (`python -m benchmarks.child respond nats-py`)."""


async def _rss_after(url: str, settle: float, *args: str, announced: bool) -> float:
    bus = await Bus.connect(url, name="bench-memory")
    try:
        if announced:
            async with bus.expect(ReplicaReady, timeout=60.0):
                child = await spawn(*args, stdout=False)
        else:
            child = await spawn(*args)
            await child.ready()
        try:
            await asyncio.sleep(settle)  # idle: nothing to wait for but time
            return float(psutil.Process(child.pid).memory_info().rss) / 2**20
        finally:
            await child.stop()
    finally:
        await bus.close()


async def run(url: str, *, settle: float, reps: int) -> tuple[list[Result], list[Check], str]:
    agent: list[float] = []
    bare: list[float] = []
    for _ in range(reps):
        agent.append(await _rss_after(url, settle, "-m", "busagents", "run", AGENT, "--nats", url, announced=True))
        bare.append(
            await _rss_after(url, settle, "-m", "benchmarks.child", "respond", "nats-py", "--url", url, announced=False)
        )
    results = [
        Result(NAME, "busagents run: one agent process, idle", "RSS MiB", agent, higher_is_better=False),
        Result(
            NAME, "bare nats-py process, one subscription", "RSS MiB", bare, higher_is_better=False, note="reference"
        ),
    ]
    checks = [Check("Idle agent process RSS (MiB)", median(agent), 60.0, at_least=False)]
    return results, checks, METHOD.format(agent=AGENT, settle=settle)
