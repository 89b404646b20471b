"""Results, targets, the machine they were measured on, and the RESULTS.md they are written to."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

from busagents.server import find_server_binary

__all__ = ["Check", "LoadMeter", "Machine", "Result", "render", "table", "write_results"]

#: Sections of RESULTS.md this runner writes; any other ``## `` section (e.g. another
#: engineer's "Flight assistant at scale") is kept, verbatim, when the file is rewritten.
OWN_SECTIONS = ("Machine", "Targets", "Results", "What is measured")


@dataclass(slots=True)
class Result:
    """One line of the results table: a benchmark variant and its per-repetition samples."""

    benchmark: str
    variant: str
    metric: str
    samples: list[float]
    higher_is_better: bool = True
    ratio: float | None = None  # same-run ratio of this variant to the benchmark's baseline
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass(slots=True)
class Check:
    """A target of the benchmarks issue and whether this run met it."""

    target: str
    measured: float
    limit: float
    at_least: bool  # True: measured >= limit meets the target; False: measured <= limit
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Per-repetition ratios of two variants measured side by side in the same repetition."""
    return [a / b for a, b in zip(numerator, denominator, strict=True) if b]


@dataclass(slots=True)
class Machine:
    cpu: str
    cores: int
    ram_gb: float
    python: str
    versions: dict[str, str]
    date: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Per benchmark: (wall seconds, other processes' CPU in cores, hypervisor steal in cores).
    other_load: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    @classmethod
    def probe(cls) -> Machine:
        return cls(
            cpu=_cpu_model(),
            cores=os.cpu_count() or 0,
            ram_gb=psutil.virtual_memory().total / 2**30,
            python=f"{platform.python_implementation()} {platform.python_version()}",
            versions={
                "nats-server": _server_version(),
                **{name: _version(name) for name in ("busagents", "nats-py", "msgspec", "pydantic", "faststream")},
            },
            date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            load_before=os.getloadavg(),
        )

    def finish(self) -> None:
        self.load_after = os.getloadavg()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _server_version() -> str:
    try:
        out = subprocess.run([find_server_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    return out.strip().removeprefix("nats-server: ")


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


class LoadMeter:
    """CPU time other processes used while a benchmark ran: the machine is shared, say how much.

    Other = the machine's busy CPU time minus this run's own (this process, the
    children it reaped, and nats-server), averaged over the wall time, in cores.
    """

    def __init__(self, server_pid: int | None) -> None:
        self._server_pid = server_pid
        self._wall = time.monotonic()
        self._busy, self._own, self._steal = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        me = psutil.Process().cpu_times()
        own = me.user + me.system + me.children_user + me.children_system
        if self._server_pid is not None:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self._server_pid).cpu_times()
                own += server.user + server.system
        return busy, own, getattr(t, "steal", 0.0)

    def stop(self) -> tuple[float, float]:
        """(other processes' CPU, hypervisor steal), in cores on average since the start."""
        busy, own, steal = self._sample()
        wall = max(time.monotonic() - self._wall, 1e-9)
        return max(0.0, (busy - self._busy) - (own - self._own)) / wall, (steal - self._steal) / wall


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: list[Result]) -> str:
    lines = [
        "| Benchmark | Variant | Metric | Median | Repetitions | vs baseline |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in results:
        reps = ", ".join(_fmt(s) for s in r.samples)
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        variant = r.variant + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.benchmark} | {variant} | {r.metric} | {_fmt(r.median)} | {reps} | {ratio} |")
    return "\n".join(lines)


def checks_table(checks: list[Check]) -> str:
    lines = ["| Target | Measured | Met | |", "| --- | ---: | --- | --- |"]
    for c in checks:
        sign = ">=" if c.at_least else "<="
        lines.append(
            f"| {c.target} ({sign} {_fmt(c.limit)}) | {_fmt(c.measured)} | {'yes' if c.met else '**no**'} "
            f"| {c.detail} |"
        )
    return "\n".join(lines)


def machine_table(m: Machine) -> str:
    rows = [
        ("Date", m.date),
        ("CPU", f"{m.cpu}, {m.cores} cores"),
        ("RAM", f"{m.ram_gb:.1f} GiB"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", m.python),
        *((name, v) for name, v in m.versions.items()),
        ("Load average (1, 5, 15 min) at start", ", ".join(f"{x:.2f}" for x in m.load_before)),
        ("Load average at end", ", ".join(f"{x:.2f}" for x in m.load_after)),
        *(
            (
                f"{name}: wall time, CPU used by other processes, steal",
                f"{wall:.0f} s, {other:.2f} cores, {steal:.2f} cores",
            )
            for name, (wall, other, steal) in m.other_load.items()
        ),
    ]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


def render(machine: Machine, results: list[Result], checks: list[Check], method: str, reps: int) -> str:
    """The generated part of RESULTS.md."""
    return "\n".join(
        [
            "# Benchmark results",
            "",
            f"Generated by `python -m benchmarks` (`make bench`) with {reps} repetitions of each variant; "
            "the medians are reported and every repetition is listed. Ratios are the median of the "
            "per-repetition ratios of variants run one after the other in the same repetition, against "
            "the same nats-server. Sections below that this runner does not generate are kept as they are "
            "when it rewrites the file.",
            "",
            "## Machine",
            "",
            machine_table(machine),
            "",
            "## Targets",
            "",
            checks_table(checks),
            "",
            "## Results",
            "",
            table(results),
            "",
            "## What is measured",
            "",
            method.strip(),
            "",
        ]
    )


def _other_sections(text: str) -> list[str]:
    """The ``## `` sections of an existing RESULTS.md that this runner does not generate."""
    kept = []
    for chunk in re.split(r"(?m)^(?=## )", text):
        if not chunk.startswith("## "):
            continue
        title = chunk[3:].splitlines()[0].strip()
        if title not in OWN_SECTIONS:
            kept.append(chunk.rstrip() + "\n")
    return kept


def write_results(path: Path, generated: str) -> None:
    """Write RESULTS.md, keeping the sections other benchmarks or engineers wrote into it."""
    kept = _other_sections(path.read_text()) if path.exists() else []
    path.write_text("\n".join([generated.rstrip() + "\n", *kept]))
