"""The runner: every benchmark against one nats-server it starts, then the table and RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from busagents.server import NatsServer

from . import durable, llm_storm, memory, replicas, reqreply, scale, scaleout, throughput, tracing
from .report import Check, LoadMeter, Machine, Result, checks_table, render, table, write_results

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: A receiver may fall behind the publisher by the whole run: let nats-server buffer it.
SERVER_CONFIG = 'max_pending: 1073741824\nwrite_deadline: "60s"\n'

Outcome = tuple[list[Result], list[Check], str]


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much each benchmark does per repetition."""

    events: int = 100_000
    events_warmup: int = 5_000
    durable: int = 50_000
    durable_warmup: int = 2_000
    requests: int = 5_000
    requests_warmup: int = 500
    jobs: int = 2_000
    jobs_warmup: int = 20
    work: int = 40_000
    settle: float = 3.0
    flights: int = 2_000
    passengers: int = 200_000
    day_seconds: float = 8.0  # the demo's default
    tracing_flights: int = 400
    tracing_passengers: int = 30_000
    llm_small_flights: int = 40  # the per-booking comparison's day (the full day would take hours)
    llm_small_passengers: int = 3_000


QUICK = Sizes(
    events=2_000,
    events_warmup=200,
    durable=1_000,
    durable_warmup=100,
    requests=200,
    requests_warmup=20,
    jobs=20,
    jobs_warmup=2,
    work=2_000,
    settle=0.5,
    flights=20,
    passengers=600,
    day_seconds=0.0,
    tracing_flights=20,
    tracing_passengers=600,
    llm_small_flights=12,
    llm_small_passengers=300,
)

BENCHMARKS: dict[str, Callable[[str, Sizes, int], Awaitable[Outcome]]] = {
    "throughput": lambda url, s, reps: throughput.run(
        url, count=s.events, warmup=s.events_warmup, reps=reps, faststream=throughput.faststream_installed()
    ),
    "request": lambda url, s, reps: reqreply.run(url, count=s.requests, warmup=s.requests_warmup, reps=reps),
    "durable": lambda url, s, reps: durable.run(url, count=s.durable, warmup=s.durable_warmup, reps=reps),
    "replicas": lambda url, s, reps: replicas.run(
        url, jobs=s.jobs, work=s.work, warmup=s.jobs_warmup, reps=reps, cores=_cores()
    ),
    "memory": lambda url, s, reps: memory.run(url, settle=s.settle, reps=reps),
    # The demo starts its own embedded nats-server, as a user's run does.
    "scale": lambda url, s, reps: scale.run(flights=s.flights, passengers=s.passengers, day=s.day_seconds, reps=reps),
    # The day as fast as it goes, in one process and as a swarm of processes, each on its own nats-server.
    "scaleout": lambda url, s, reps: scaleout.run(flights=s.flights, passengers=s.passengers, reps=reps),
    # The day as fast as it goes with tracing off, on and sampled, spans exported over OTLP/HTTP.
    "tracing": lambda url, s, reps: tracing.run(flights=s.tracing_flights, passengers=s.tracing_passengers, reps=reps),
    # The storm day decided by the LLM reasoner against a stand-in Messages API (2 s a request, 5 % 429).
    "llm_storm": lambda url, s, reps: llm_storm.run(
        flights=s.flights, passengers=s.passengers, small=(s.llm_small_flights, s.llm_small_passengers), reps=reps
    ),
}


def _cores() -> int:
    return os.cpu_count() or 1


async def run_all(
    names: list[str], sizes: Sizes, reps: int, machine: Machine, log: Callable[[str], None]
) -> tuple[list[Result], list[Check], list[str]]:
    """Run the named benchmarks against one nats-server started for them."""
    results: list[Result] = []
    checks: list[Check] = []
    methods: list[str] = []
    with tempfile.TemporaryDirectory(prefix="busagents-bench-") as tmp:
        config = Path(tmp) / "nats.conf"
        config.write_text(SERVER_CONFIG)
        with NatsServer(config_file=config) as server:
            for name in names:
                started = time.monotonic()
                log(f"{name}: running {reps} repetition(s)...")
                meter = LoadMeter(server.process.pid if server.process else None)
                r, c, m = await BENCHMARKS[name](server.url, sizes, reps)
                other, steal = meter.stop()
                wall = time.monotonic() - started
                machine.other_load[name] = (wall, other, steal)
                log(f"{name}: done in {wall:.1f}s; other processes used {other:.2f} cores meanwhile")
                results += r
                checks += c
                methods.append(m)
    return results, checks, methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each variant (default 3; medians reported)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--quick", action="store_true", help="tiny counts: checks that everything runs, measures nothing"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if "throughput" in names and not throughput.faststream_installed():
        parser.error("FastStream is not installed: pip install -e '.[bench]' (or run 'make bench')")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    machine = Machine.probe()
    results, checks, methods = asyncio.run(run_all(names, QUICK if args.quick else Sizes(), args.reps, machine, log))
    machine.finish()
    print(table(results))
    print()
    print(checks_table(checks))
    if not args.no_write:
        write_results(args.output, render(machine, results, checks, "\n\n".join(methods), args.reps))
        log(f"wrote {args.output}")
    return 0
