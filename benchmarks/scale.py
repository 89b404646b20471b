"""The flight assistant at scale: ``busagents demo --flights 2000 --passengers 200000 --report``, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from .proc import spawn
from .report import Check, Result

NAME = "Flight assistant at scale"

#: (label, extra demo options): everything in one process, then the three busiest agents as processes.
MODES = (("in-process", ()), ("--processes", ("--processes",)))

METHOD = """\
**Flight assistant at scale.** The reference application end to end, as a user runs it:
`busagents demo --flights {flights} --passengers {passengers:,} --seed 7 --day-seconds {day:g}
--report r.json --quiet` (status feed, monitor, context, reasoner, rebooker and notifier on the
demo's own embedded nats-server, SQLite booking store), once in one process and once with
`--processes` (reasoner, rebooker and notifier as `busagents run` processes). *Wall time* is
the whole command, as `time` shows it: generating the day, loading the store, the run, the
audit, starting and stopping nats-server. From the demo's report: *msgs/s* = messages on
`travel.>` per second of the run, *latency* = disruption to each passenger's notification
(`Ba-Sent-At` to `Ba-Sent-At`). *Peak RSS* per process is the largest resident set seen
(`VmHWM`, read every 0.25 s) of the demo, each agent process and nats-server. Every run must
notify every affected passenger, sell no seat twice and dead-letter nothing (the target row).
The day is played in {day:g} s, faster than one core can serve it, so latency is mostly queueing;
the detailed section below shows a day paced over 60 s."""


def _role(proc: psutil.Process, root: int) -> str:
    """Which part of the demo a process is: demo, nats-server, or the agent a ``busagents run`` serves."""
    if proc.pid == root:
        return "demo"
    try:
        argv: list[str] = [str(a) for a in proc.cmdline()]
    except psutil.Error:
        return "?"
    if argv and Path(argv[0]).name.startswith("nats-server"):
        return "nats-server"
    if "run" in argv and argv.index("run") + 1 < len(argv):
        return argv[argv.index("run") + 1]
    return Path(argv[0]).name if argv else "?"


def _peak_kib(proc: psutil.Process) -> int:
    """Peak resident set (VmHWM) where /proc has it, else the current RSS."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        return int(proc.memory_info().rss // 1024)
    except psutil.Error:
        return 0


async def _one(
    flights: int, passengers: int, day: float, extra: tuple[str, ...]
) -> tuple[dict[str, Any], float, dict[str, float]]:
    """One demo run: (its report, wall seconds, peak RSS MiB per role)."""
    with tempfile.TemporaryDirectory(prefix="busagents-bench-scale-") as tmp:
        report = Path(tmp) / "report.json"
        args = ["--flights", str(flights), "--passengers", str(passengers), "--seed", "7"]
        args += ["--day-seconds", f"{day:g}", "--report", str(report), "--quiet", "--no-live", *extra]
        started = time.perf_counter()
        child = await spawn("-m", "busagents", "demo", *args, stdout=False)
        root = psutil.Process(child.pid)
        peaks: dict[tuple[str, int], int] = defaultdict(int)
        while child.proc.returncode is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                role, kib = _role(proc, child.pid), _peak_kib(proc)
                if role != "?" and kib > 0:  # not a process that ended while it was being read
                    peaks[(role, proc.pid)] = max(peaks[(role, proc.pid)], kib)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), 0.25)
        wall = time.perf_counter() - started
        if child.proc.returncode != 0:
            raise child.failure(f"exited with {child.proc.returncode}")
        data: dict[str, Any] = json.loads(report.read_text())
        child.stderr.unlink(missing_ok=True)
    by_role: dict[str, float] = {}
    for (role, _pid), kib in peaks.items():
        by_role[role] = max(by_role.get(role, 0.0), kib / 1024)
    return data, wall, by_role


def _served(report: dict[str, Any]) -> bool:
    return bool(
        report["notified"] == report["affected"] > 0
        and report["seat_conflicts"] == 0
        and report["dead_lettered"] == 0
        and report.get("stranded", 0) == 0
    )


async def run(*, flights: int, passengers: int, day: float, reps: int) -> tuple[list[Result], list[Check], str]:
    results: list[Result] = []
    served: list[bool] = []
    for label, extra in MODES:
        walls: list[float] = []
        rates: list[float] = []
        p50: list[float] = []
        p99: list[float] = []
        rss: dict[str, list[float]] = defaultdict(list)
        affected: list[int] = []
        for _ in range(reps):
            report, wall, peaks = await _one(flights, passengers, day, extra)
            served.append(_served(report))
            walls.append(wall)
            rates.append(report["msgs_per_second"])
            p50.append(report["latency_ms"]["p50"])
            p99.append(report["latency_ms"]["p99"])
            affected.append(report["affected"])
            for role, mib in peaks.items():
                rss[role].append(mib)
        note = f"affected = notified: {', '.join(f'{a:,}' for a in affected)}"
        variant = f"{label}: demo --flights {flights} --passengers {passengers}"
        results += [
            Result(NAME, variant, "wall s", walls, higher_is_better=False, note=note),
            Result(NAME, variant, "msgs/s", rates),
            Result(NAME, variant, "latency p50 ms", p50, higher_is_better=False),
            Result(NAME, variant, "latency p99 ms", p99, higher_is_better=False),
        ]
        for role in sorted(rss, key=lambda r: (r != "demo", r == "nats-server", r)):
            samples = rss[role]
            if len(samples) == reps:  # seen in every run (not a short-lived helper process)
                results.append(Result(NAME, f"{label}: peak RSS, {role}", "MiB", samples, higher_is_better=False))
    share = sum(served) / len(served)
    checks = [
        Check(
            "Scale runs with notified == affected, 0 seat conflicts, 0 dead letters (share)",
            share,
            1.0,
            at_least=True,
            detail=f"{sum(served)} of {len(served)} runs",
        )
    ]
    return results, checks, METHOD.format(flights=flights, passengers=passengers, day=day)
