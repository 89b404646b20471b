"""What tracing costs: the flight day as fast as it goes, tracing off, on (every span), sampled 10 %, views' spans too.

``busagents demo --flights 400 --passengers 30000 --day-seconds 0 --processes`` four ways in each
repetition (the order rotates), the spans exported over OTLP/HTTP to a receiver in this process
(it counts what it gets and decodes nothing, so it costs the demo nothing but the sockets).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from busagents.testing import OtlpReceiver

from .proc import ROOT
from .report import Check, Result, ratios

__all__ = ["NAME", "VARIANTS", "run"]

NAME = "Tracing cost"
SEED = 7
#: The most tracing may add to the day's run time, every span kept.
TARGET = 0.15
#: label -> the OTEL_* variables of that variant (None: tracing off).
VARIANTS: dict[str, dict[str, str] | None] = {
    "tracing off": None,
    "every span": {},
    "sampled 10 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
    "every span, views' too": {"BUSAGENTS_TRACE_VIEWS": "1"},
}

METHOD = """\
**Tracing cost.** `busagents demo --flights {flights} --passengers {passengers:,} --seed {seed}
--day-seconds 0 --processes --report r.json --quiet --no-live` (feed, monitor and context in the demo
process; reasoner, rebooker, notifier and concierge as `busagents run` processes), four ways in each repetition,
the order rotating: *tracing off* (no `OTEL_*` variable), *every span* (`OTEL_EXPORTER_OTLP_ENDPOINT`
pointing at an OTLP/HTTP receiver in the benchmark process, the default sampler: every span is kept and
exported), *sampled 10 %* (also `OTEL_TRACES_SAMPLER=parentbased_traceidratio`,
`OTEL_TRACES_SAMPLER_ARG=0.1`) and *every span, views' too* (also `BUSAGENTS_TRACE_VIEWS=1`: the handlers
of views, which record no span by default, each record a CONSUMER span; in this day the context agent's
views of the feed and of the booking changes). The receiver answers every request and only counts requests and
bytes; it speaks HTTP/1.1 and keeps the connection, as collectors do.
*Run time* is the demo's own `run_seconds` (the feed's first publish to the last passenger notified);
*vs baseline* = run time with tracing / run time without, per repetition (median reported); the
target is at most 1.15 (15 % overhead) with every span kept.
*CPU s* = user + system time of the whole command (the demo process, the agent processes and
nats-server it waits for), day generation and start-up included: less sensitive than the run time
to what other processes on a shared machine do. The MB of spans the receiver got show the export was
real. Every run must notify every affected passenger."""


async def _demo(flights: int, passengers: int, otel: dict[str, str] | None, endpoint: str) -> dict[str, Any]:
    """One demo run with the given OTEL_* variables (None: none at all); its report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if otel is not None:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **otel}
    with tempfile.TemporaryDirectory(prefix="busagents-bench-tracing-") as tmp:
        report = Path(tmp) / "report.json"
        args = ["--flights", str(flights), "--passengers", str(passengers), "--seed", str(SEED)]
        args += ["--day-seconds", "0", "--processes", "--report", str(report), "--quiet", "--no-live"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "busagents",
            "demo",
            *args,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            tail = "\n".join(err.decode(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"busagents demo {' '.join(args)} exited with {proc.returncode}\n{tail}")
        data: dict[str, Any] = json.loads(report.read_text())
    # the demo waits for its nats-server and agent processes: their CPU time is counted in its own
    data["cpu_seconds"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return data


async def run(*, flights: int, passengers: int, reps: int) -> tuple[list[Result], list[Check], str]:
    labels = list(VARIANTS)
    runs: dict[str, list[float]] = {label: [] for label in labels}
    exported: dict[str, list[float]] = {label: [] for label in labels}
    cpu: dict[str, list[float]] = {label: [] for label in labels}
    served: list[bool] = []
    with OtlpReceiver(decode=False) as receiver:
        for rep in range(reps):
            order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
            for label in order:
                before = receiver.bytes
                started = time.perf_counter()
                report = await _demo(flights, passengers, VARIANTS[label], receiver.endpoint)
                await asyncio.sleep(0)  # the last export request was answered before the demo exited
                served.append(report["notified"] == report["affected"] > 0 and report["dead_lettered"] == 0)
                runs[label].append(report["run_seconds"])
                cpu[label].append(report["cpu_seconds"])
                exported[label].append((receiver.bytes - before) / 1e6)
                print(
                    f"  tracing: {label}: run {report['run_seconds']} s, wall {time.perf_counter() - started:.1f} s, "
                    f"CPU {report['cpu_seconds']:.1f} s, {(receiver.bytes - before) / 1e6:.1f} MB exported",
                    file=sys.stderr,
                    flush=True,
                )
    off = runs["tracing off"]
    results = [
        Result(
            NAME,
            f"{label}: demo --flights {flights} --passengers {passengers} --processes",
            "run s",
            runs[label],
            higher_is_better=False,
            ratio=None if label == "tracing off" else median(ratios(runs[label], off)),
            note=f"{median(exported[label]):.1f} MB of spans exported",
        )
        for label in labels
    ]
    results += [
        Result(
            NAME,
            f"{label}: CPU time of the whole command (demo, agent processes, nats-server)",
            "CPU s",
            cpu[label],
            higher_is_better=False,
            ratio=None if label == "tracing off" else median(ratios(cpu[label], cpu["tracing off"])),
        )
        for label in labels
    ]
    slowdown = {label: ratios(runs[label], off) for label in labels[1:]}
    checks = [
        Check(
            f"Tracing on, every span kept: run time / run time off, {flights} flights, {passengers:,} passengers",
            median(slowdown["every span"]),
            1 + TARGET,
            at_least=False,
            detail="per repetition: "
            + ", ".join(f"{r - 1:+.0%}" for r in slowdown["every span"])
            + "; sampled 10 %: "
            + ", ".join(f"{r - 1:+.0%}" for r in slowdown["sampled 10 %"])
            + "; every span, views' too: "
            + ", ".join(f"{r - 1:+.0%}" for r in slowdown["every span, views' too"]),
        ),
        Check(
            "Tracing runs with notified == affected, 0 dead letters (share)",
            sum(served) / len(served),
            1.0,
            at_least=True,
            detail=f"{sum(served)} of {len(served)} runs",
        ),
    ]
    return results, checks, METHOD.format(flights=flights, passengers=passengers, seed=SEED)
