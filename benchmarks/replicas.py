"""Replica scaling: a CPU-bound command handler run by ``busagents run --replicas 1`` and ``--replicas 2``."""

from __future__ import annotations

import time
from collections import Counter
from statistics import median

import psutil

from busagents import Bus

from .contracts import Crunch, Crunched, ReplicaReady
from .proc import Child, spawn
from .report import Check, Result, ratios

NAME = "Replica scaling"
AGENT = "benchmarks.contracts:Cruncher"

METHOD = """\
**Replica scaling.** `busagents run {agent} --replicas N` (the real CLI: N worker
processes in one queue group) runs a handler that does {work:,} iterations of pure-Python
arithmetic per `Crunch` command (holding the GIL, about {ms:.1f} ms each) and returns a
`Crunched` event. The benchmark process waits until every replica announced itself,
sends {warmup} warm-up commands and awaits their events, then publishes {jobs:,} commands
and times until the last of the {jobs:,} `Crunched` events arrived: jobs/s = {jobs:,} /
that time. NATS spreads a queue group's messages at random, so the split between the two
replicas is not exactly even (shown in the table). The machine has {cores} cores, shared
with nats-server and the benchmark process (and, here, other users); the table shows how much
CPU time the replica processes actually got while measured (their CPU seconds / wall time)."""


async def _start(url: str, bus: Bus, replicas: int) -> Child:
    async with bus.expect(ReplicaReady, count=replicas, timeout=60.0):
        child = await spawn("-m", "busagents", "run", AGENT, "--nats", url, "--replicas", str(replicas), stdout=False)
    return child


async def _batch(bus: Bus, first: int, jobs: int, work: int) -> Counter[int]:
    async with bus.expect(Crunched, count=jobs, timeout=600.0) as done:
        for job in range(first, first + jobs):
            await bus.publish(Crunch(job=job, work=work))
        await bus.flush()
    return Counter(r.body.pid for r in done.messages)


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def _one(url: str, replicas: int, jobs: int, work: int, warmup: int) -> tuple[float, Counter[int], float]:
    """(jobs/s, jobs per replica pid, cores the replicas got on average while measured)."""
    bus = await Bus.connect(url, name="bench-replicas")
    child = await _start(url, bus, replicas)
    try:
        await _batch(bus, 0, warmup, work)
        pids = [child.pid] if replicas == 1 else [p.pid for p in psutil.Process(child.pid).children()]
        cpu = _cpu_seconds(pids)
        started = time.perf_counter()
        split = await _batch(bus, warmup, jobs, work)
        wall = time.perf_counter() - started
        cores = (_cpu_seconds(pids) - cpu) / wall
    finally:
        await child.stop()
        await bus.close()
    return jobs / wall, split, cores


def _per_cpu(rates: list[float], cores: list[float]) -> list[float]:
    """Jobs per CPU-second of the replicas (0 when too short to measure CPU time)."""
    return [r / c if c > 0 else 0.0 for r, c in zip(rates, cores, strict=True)]


async def run(
    url: str, *, jobs: int, work: int, warmup: int, reps: int, cores: int
) -> tuple[list[Result], list[Check], str]:
    samples: dict[int, list[float]] = {1: [], 2: []}
    got: dict[int, list[float]] = {1: [], 2: []}
    shares: list[float] = []
    for rep in range(reps):
        for replicas in (1, 2) if rep % 2 == 0 else (2, 1):
            rate, split, used = await _one(url, replicas, jobs, work, warmup)
            samples[replicas].append(rate)
            got[replicas].append(used)
            if replicas == 2:
                shares.append(max(split.values()) / jobs)
    scale = median(ratios(samples[2], samples[1]))
    results = [
        Result(
            NAME,
            "CPU-bound handler, 1 replica process",
            "jobs/s",
            samples[1],
            ratio=1.0,
            note=f"it got {median(got[1]):.2f} cores",
        ),
        Result(
            NAME,
            "CPU-bound handler, 2 replica processes",
            "jobs/s",
            samples[2],
            ratio=scale,
            note=f"they got {median(got[2]):.2f} cores; the busiest took {median(shares):.0%} of the jobs",
        ),
    ]
    per_core = median(ratios(_per_cpu(samples[2], got[2]), _per_cpu(samples[1], got[1])) or [0.0])
    detail = (
        f"the 2 replicas got {median(got[2]):.2f} cores of CPU time between them, 1 replica "
        f"{median(got[1]):.2f}; jobs per CPU-second, 2 replicas / 1: {per_core:.2f}"
    )
    checks = [Check("2 replicas / 1 replica, CPU-bound", scale, 1.7, at_least=True, detail=detail)]
    ms = 1000 / median(samples[1])
    return results, checks, METHOD.format(agent=AGENT, work=work, ms=ms, warmup=warmup, jobs=jobs, cores=cores)
