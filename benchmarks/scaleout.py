"""Scale-out of the flight assistant: the whole day, as fast as it goes, in one process and as a swarm.

The same seeded day (``--day-seconds 0``) runs four ways against the same code: ``busagents demo``
(every agent in one process), then ``busagents swarm up`` with 1 and with 2 replicas of every agent
(the feed once), and with 1 replica on one core (what a second core gives); and, beside them, the
swarm of the code before the scale-out work (its history's :data:`BASELINE_COMMIT`) at 1 replica, the
figure the CPU target halves. A watcher on the bus times the
swarm's run and counts what passengers were told; psutil gives each process's CPU time from when it
was ready to the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import msgspec
import nats.js.errors
import psutil
from nats.aio.msg import Msg

from busagents import Bus
from busagents.server import NatsServer

from .report import Check, Result, ratios

__all__ = ["BASELINE_CPU_MS_PER_AFFECTED", "LABELS", "NAME", "ONE_CORE", "STAGES", "run"]

NAME = "Flight swarm scale-out"
SEED = 7
#: The agents ``busagents demo`` runs in its one process, so both sides do the same work.
AGENTS = (
    "flight-context",
    "flight-monitor",
    "flight-reasoner",
    "flight-rebooker",
    "flight-notifier",
    "flight-concierge",
)
FEED = "flight-feed"  # plays the day once: always one
SERVER = "nats-server"
SUPERVISOR = "swarm up"
#: Rows of the per-stage table, in pipeline order.
STAGES = (FEED, *AGENTS, SERVER, SUPERVISOR)
#: The code before the scale-out work of issue 9, measured in each run beside today's (its swarm at 1 replica).
BASELINE_COMMIT = "6a2a9a0"
#: The mode of that measurement.
BASELINE = -1
#: The mode of the swarm with 1 replica of every agent and every process of it (nats-server included) on
#: one core: what a second core gives the swarm.
ONE_CORE = 10
#: Mode -> label; mode 0 is the single process, the baseline's swarm, the swarm on one core, else the
#: replicas of every agent (on every core).
LABELS = {
    0: "single process",
    1: "swarm, 1 replica",
    2: "swarm, 2 replicas",
    ONE_CORE: "swarm, 1 replica, on one core",
    BASELINE: f"before the scale-out work ({BASELINE_COMMIT}): swarm, 1 replica",
}
#: Replicas of every agent in each swarm mode.
REPLICAS = {1: 1, 2: 2, ONE_CORE: 1, BASELINE: 1}
#: The run is over when every count adds up and nothing new was seen on the bus for this long.
QUIET = 2.0
#: Seconds without anything new on the bus, once the feed started, after which the run has failed.
STALL = 90.0

#: The figure before the scale-out work of issue 9: CPU-ms per affected passenger of the swarm with one
#: replica of every agent, all processes summed, day generation excluded (2,000 flights, 200,000
#: passengers); the median of 7 runs of this benchmark (3 invocations) against the landed code, on the
#: machine of benchmarks/RESULTS.md (the runs: 0.80 to 1.04 ms; section "Flight swarm scale-out").
BASELINE_CPU_MS_PER_AFFECTED = 0.93
BASELINE_MEASURED = "on 2026-11-29 against commit 6a2a9a0 (median of 7 runs, shared machine: load average 4 to 13)"

METHOD = """\
**Flight swarm scale-out.** The seeded day of {flights:,} flights and {passengers:,} passengers (seed
{seed}, {status_updates:,} status updates) played as fast as it goes (`--day-seconds 0`), four ways, one
after the other in each repetition (the order alternates), against the same code ({code}).
*Single process* = `busagents demo --flights {flights} --passengers {passengers} --seed {seed}
--day-seconds 0 --report r.json --quiet --no-live` (every agent in one process, on the demo's own
nats-server). *Swarm, N replicas* = `busagents swarm up swarm.toml --nats URL` with `replicas = N` for
{agents}, on a fresh nats-server (JetStream) started for the run, scheduled as the code's own `swarm up`
schedules its embedded server, and the replicas as it schedules them: Linux's `SCHED_BATCH` for both
since 2026-12-01 (swarm.toml's `scheduling` and `server_scheduling` defaults), the OS's normal policy
for the code before the scale-out work; the SQLite booking store is loaded with the day's bookings before
the swarm starts. Once every replica sent its first heartbeat (it
serves; a context replica has built its view), a second `busagents swarm up feed.toml` starts one
`{feed}`, which plays the day: as in the single process, where every agent is started before the feed,
no replica spends its start-up inside the run. *On one core* = the swarm with 1 replica of every agent
with each of its processes (nats-server, `swarm up` and every replica, the feed) allowed one core only
(`sched_setaffinity`, inherited from the benchmark's thread that starts them; the mask read back off
every thread of every process at the end of the run is in the row's note): what the swarm gains from a
second core. A watcher in the benchmark process keeps its own cost
off the two cores it measures: on the bus it takes the first `travel.flight.status` message only (the
server then unsubscribes it), disruptions, assessments, rejections and heartbeats, not the day's 8,816
status updates, 18,000 notices and 12 MB of booking changes, which nats-server would copy to it on the
swarm's CPU time; it reads the notices from the notifiers' outbox instead, where each is written before
its `PassengerNotified` is published (the outbox of the code before the scale-out work names no disruption:
each of its lines counts as a notice). *Run time* = from the first status update it saw to the last
write of a new notice into the outbox (the file's modification time). The swarm is done when every status update
was published and handled by the monitor and the context (their stats heartbeats, every second), every
disruption was assessed, every passenger counted by a `DisruptionAssessed` (the last one per disruption
id) was notified (distinct disruption and passenger), and nothing new came for {quiet:g} s; then
`swarm up` gets SIGTERM and the store is audited (seats held twice, active bookings left on a
cancelled flight). *Wall time* = the whole command, from its start until it exited (for the swarm:
starting the processes, each generating the day, the run, the {quiet:g} s of quiet, draining).
*CPU-s per stage* = user + system CPU time (psutil) of each process of that agent from the first status
update (or its first heartbeat, if that came later) to the end of the run, summed over its replicas;
nats-server and the `swarm up` supervisor are stages too. *Messages handled* = the agent's `handled`
counters summed over its replicas (the feed handles nothing; it publishes). *CPU-ms per affected
passenger* = all processes' CPU time over the run / affected passengers: generating the day, imports and
start-up are excluded. The single process cannot be split by stage and prints nothing while it runs: its
row counts the CPU time of the demo and its nats-server from the moment that nats-server was started
(the day generated, the bookings not yet loaded) to the demo's exit, so loading the SQLite store,
starting the agents, the audit and the shutdown are included; its *run time* is the demo's own report
(`run_seconds`: from before the feed's first publish to the last notification). *Before the scale-out
work* = the swarm with 1 replica of every agent of commit {baseline_commit} (the code before issue 9; 2
replicas of it told passengers twice), extracted from this repository's history (`git archive`) and run
the same way on its own day and store, in every repetition. The targets compare the 2-replica run time
with the single process's in the same repetition, the 1-replica swarm's run time on every core with
its run time on one core, and the 2-replica CPU per affected passenger with half
the figure before the scale-out work measured in the same run (without that history: {baseline})."""

# Runs in the children's interpreter, so it imports the code under test (PYTHONPATH wins over the
# editable installs; the benchmark process itself may run other code): load the store, audit it.
_HELPER = """\
import asyncio, json, sys
import busagents, busagents_flight
from busagents_flight.data import generate
from busagents_flight.feed import status_feed
from busagents_flight.store import open_store

async def main(command, path, flights, passengers, seed):
    store = open_store(path)
    if command == "load":
        day = generate(flights, passengers, seed)
        feed = status_feed(day)
        async with store:
            await store.load(day.bookings)
        out = {
            "status_updates": len(feed),
            "cancelled": sorted({u.flight_id for u in feed if u.status == "cancelled"}),
            "busagents": busagents.__file__,
            "busagents_flight": busagents_flight.__file__,
        }
    else:
        async with store:
            audit = await store.audit(json.load(sys.stdin))
        out = {"seat_conflicts": audit.seat_conflicts, "stranded": audit.stranded_bookings}
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])))
"""


@dataclass(frozen=True, slots=True)
class _Day:
    """The day as the code under test generates it, and where that code is."""

    flights: int
    passengers: int
    store: Path  # loaded once, copied for each swarm run
    status_updates: int
    cancelled: list[str]
    code: str
    path: str = ""  # PYTHONPATH of the processes: the checkout they import ("": this one, as installed)
    agents: tuple[str, ...] = AGENTS  # the agents of AGENTS that checkout has
    server_scheduling: str = "normal"  # the swarm's nats-server's, as that checkout's `swarm up` starts it


@dataclass(slots=True)
class _Run:
    """One run of the day in one mode."""

    run_s: float
    wall_s: float
    affected: int
    notified: int
    seat_conflicts: int
    stranded: int
    redecided: int
    dead_lettered: int
    cpu_s: float  # the day's CPU time, all processes (see METHOD)
    whole_cpu_s: float = 0.0  # single process: the whole command's, generation included
    status_updates: int = 0  # published by the feed, as the watcher saw them
    context_ready_s: float = 0.0  # a fresh flight-context replica started after the day: start -> serving
    context_replay_s: float = 0.0  # of which replaying the feed's and booking changes' streams
    stages: dict[str, tuple[int, float]] = field(default_factory=dict)  # messages handled, CPU-s
    cores: int = 0  # swarm: the cores its processes were allowed, all of them together (read off each one)

    @property
    def served(self) -> bool:
        return self.notified == self.affected > 0 and not (self.seat_conflicts or self.stranded or self.dead_lettered)

    @property
    def cpu_ms_per_affected(self) -> float:
        return 1000 * self.cpu_s / max(self.affected, 1)


def _env(day: _Day, tmp: Path) -> dict[str, str]:
    path = {"PYTHONPATH": day.path} if day.path else {}
    return {
        **os.environ,
        **path,
        "BUSAGENTS_FLIGHT_FLIGHTS": str(day.flights),
        "BUSAGENTS_FLIGHT_PASSENGERS": str(day.passengers),
        "BUSAGENTS_FLIGHT_SEED": str(SEED),
        "BUSAGENTS_FLIGHT_DAY_SECONDS": "0",
        "BUSAGENTS_FLIGHT_REASONER": "offline",
        "BUSAGENTS_FLIGHT_STORE": str(tmp / "bookings.sqlite3"),
        "BUSAGENTS_FLIGHT_OUTBOX": str(tmp / "outbox.jsonl"),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "1",
    }


async def _python(*args: str, cwd: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """``python args...`` in ``cwd`` (never the repository root: a child imports what PYTHONPATH says)."""
    with (cwd / "stderr.log").open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


@contextlib.contextmanager
def _on_cores(cores: set[int] | None) -> Iterator[None]:
    """Processes started inside run on ``cores`` only (None: wherever the OS puts them).

    The benchmark's own thread takes the mask while it starts them (a child inherits its parent's
    thread's mask: nats-server's threads, ``swarm up``'s replicas and their children), and gets its own
    back after, so the watcher does not add to those cores.
    """
    if cores is None:
        yield
        return
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def _tail(cwd: Path, lines: int = 25) -> str:
    path = cwd / "stderr.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


async def _helper(*args: str, cwd: Path, stdin: object = None, path: str = "") -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-c", _HELPER, *args),
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": path} if path else None,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps(stdin).encode())
    if proc.returncode != 0:
        raise RuntimeError(f"scale-out helper {args[0]!r} exited with {proc.returncode}:\n{err.decode()[-3000:]}")
    data: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return data


def _describe(root: Path) -> str:
    """A checkout: where, at which commit, with local changes to the code or not."""
    git = ["git", "-C", str(root)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "busagents", "agents", "contracts"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    except OSError:
        return str(root)
    if not commit:
        return str(root)
    return f"{root} at {commit}" + (f" with uncommitted changes to {len(changed)} files" if changed else "")


async def _prepare(flights: int, passengers: int, tmp: Path, *, root: Path | None = None, code: str = "") -> _Day:
    """The day as the checkout at ``root`` generates it (None: the installed code), its store loaded."""
    path = os.pathsep.join(str(root / part) for part in ("", "contracts", "agents")) if root else ""
    store = tmp / "bookings.sqlite3"
    got = await _helper("load", str(store), str(flights), str(passengers), str(SEED), cwd=tmp, path=path)
    if not code:
        code = _describe(Path(got["busagents"]).parents[1])  # <root>/busagents/__init__.py
        flight_code = _describe(Path(got["busagents_flight"]).parents[2])  # <root>/agents/busagents_flight/
        if flight_code != code:
            code = f"busagents from {code}, busagents_flight from {flight_code}"
    flight_pkg = Path(got["busagents_flight"]).parent
    agents = tuple(a for a in AGENTS if a != "flight-concierge" or (flight_pkg / "concierge.py").exists())
    # the nats-server as that code's `swarm up` starts its embedded one: SCHED_BATCH since swarm.toml's
    # server_scheduling (its default), the OS's normal policy before (the code before the scale-out work)
    config = Path(got["busagents"]).parent / "swarm" / "config.py"
    server = "batch" if "server_scheduling" in config.read_text() else "normal"
    return _Day(flights, passengers, store, got["status_updates"], got["cancelled"], code, path, agents, server)


def _baseline_checkout(tmp: Path) -> Path | None:
    """The code before the scale-out work (:data:`BASELINE_COMMIT`), extracted from this repository's
    history into ``tmp``; None when there is no history to take it from (a copy without ``.git``)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp / "baseline"
    out.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", BASELINE_COMMIT], capture_output=True, check=False
    )
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _cpu_when_server_starts(proc: asyncio.subprocess.Process) -> float:
    """The demo's CPU time when its nats-server appears (the day is generated by then)."""
    root = psutil.Process(proc.pid)
    while proc.returncode is None:
        with contextlib.suppress(psutil.Error):
            if any(kid.name().startswith("nats-server") for kid in root.children()):
                times = root.cpu_times()
                return float(times.user + times.system)
        await asyncio.sleep(0.02)
    return 0.0


async def _single(day: _Day, timeout: float) -> _Run:
    with tempfile.TemporaryDirectory(prefix="busagents-bench-scaleout-") as name:
        tmp = Path(name)
        report = tmp / "report.json"
        args = ["--flights", str(day.flights), "--passengers", str(day.passengers), "--seed", str(SEED)]
        args += ["--day-seconds", "0", "--timeout", str(timeout), "--report", str(report), "--quiet", "--no-live"]
        before = _children_cpu()
        started = time.perf_counter()
        proc = await _python("-m", "busagents", "demo", *args, cwd=tmp, env=_env(day, tmp))
        try:
            at_server = await _cpu_when_server_starts(proc)
            async with asyncio.timeout(timeout + 60):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        wall = time.perf_counter() - started
        whole = _children_cpu() - before
        if code != 0:
            raise RuntimeError(f"busagents demo {' '.join(args)} exited with {code}:\n{_tail(tmp)}")
        r = json.loads(report.read_text())
    return _Run(
        run_s=r["run_seconds"],
        wall_s=wall,
        affected=r["affected"],
        notified=r["notified"],
        seat_conflicts=r["seat_conflicts"],
        stranded=r.get("stranded", 0),
        redecided=r["redecided"],
        dead_lettered=r["dead_lettered"],
        cpu_s=whole - at_server,
        whole_cpu_s=whole,
    )


class _Meter:
    """CPU time of each process of the swarm, from when the run started (or it was ready) to the end."""

    def __init__(self, fixed: dict[int, str]) -> None:
        self.roles = dict(fixed)  # pid -> stage
        self._procs: dict[int, psutil.Process] = {}
        self.start: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.running = False

    def _cpu(self, pid: int) -> float | None:
        try:
            proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
            times = proc.cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system)

    def _begin(self, pid: int) -> None:
        cpu = self._cpu(pid)
        if cpu is not None:
            self.start[pid] = self.last[pid] = cpu

    def ready(self, pid: int, stage: str) -> None:
        """A process announced itself (its first heartbeat)."""
        if pid not in self.roles:
            self.roles[pid] = stage
            if self.running:
                self._begin(pid)

    def begin(self) -> None:
        """The first status update: count from now every process already there."""
        self.running = True
        for pid in self.roles:
            self._begin(pid)

    def sample(self) -> None:
        """Read every process again (the last reading stays for one that ended)."""
        for pid in self.start:
            cpu = self._cpu(pid)
            if cpu is not None:
                self.last[pid] = cpu

    def cores(self) -> int:
        """The cores the processes still running may run on, all of them together (every thread's mask)."""
        allowed: set[int] = set()
        for pid in self.roles:
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    allowed |= os.sched_getaffinity(int(task))
        return len(allowed)

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for pid, start in self.start.items():
            out[self.roles[pid]] += self.last[pid] - start
        return out


class _Disruption(msgspec.Struct):
    disruption_id: str


class _Assessed(msgspec.Struct):
    disruption_id: str
    affected_passengers: int


class _Notified(msgspec.Struct):
    """A notice of the outbox: who was told about which disruption."""

    passenger_id: str
    disruption_id: str = ""


class _Stats(msgspec.Struct):
    handled: int = 0
    dead_lettered: int = 0
    instance: str = ""


_disruption = msgspec.json.Decoder(_Disruption).decode
_assessed = msgspec.json.Decoder(_Assessed).decode
_notified = msgspec.json.Decoder(_Notified).decode
_stats = msgspec.json.Decoder(_Stats).decode


class _Watch:
    """What the benchmark sees of one swarm run: its clock, its counts, when it is done.

    It keeps its own cost off the machine it measures: it takes only the first status update off the
    bus (the clock's start; the server unsubscribes it after that one), and it reads the notices from
    the notifiers' outbox, where each is written before its ``PassengerNotified`` is published, instead
    of having nats-server copy the day's 8,816 status updates and 18,000 notices to it.
    """

    def __init__(self, meter: _Meter, status_updates: int, outbox: Path) -> None:
        self.meter = meter
        self.expected = status_updates
        self.outbox = outbox
        self.status = 0  # status updates stored in the feed's stream (read at the end)
        self.first_status = 0.0
        self.first_status_wall = 0.0  # the same moment on the clock of the outbox's modification time
        self.last_new = time.monotonic()
        self.disruptions: set[str] = set()
        self.assessed: dict[str, int] = {}  # disruption id -> affected passengers, the last assessment
        self.notified: dict[str, set[str]] = defaultdict(set)
        self.rejected = 0
        self.stats: dict[str, dict[int, _Stats]] = defaultdict(dict)  # agent -> pid -> last heartbeat
        self._read_to = 0  # bytes of the outbox read
        self._lines = 0
        self._anonymous = False  # the outbox (of older code) names no disruption

    async def subscribe(self, bus: Bus) -> None:
        await bus.nc.subscribe("travel.flight.status.>", cb=self._status, max_msgs=1)
        for subject, cb in (
            ("travel.flight.delayed.>", self._disruption),
            ("travel.flight.cancelled.>", self._disruption),
            ("travel.disruption.assessed.>", self._assessed),
            ("travel.booking.rejected.>", self._rejected),
            ("busagents.stats.>", self._heartbeat),
        ):
            await bus.nc.subscribe(subject, cb=cb)
        await bus.flush()

    async def _status(self, msg: Msg) -> None:
        if not self.meter.running:
            self.first_status_wall = time.time()
            self.first_status = self.last_new = time.monotonic()
            self.meter.begin()

    def read_outbox(self) -> None:
        """The notices written since the last read (a last line without its newline waits for the next)."""
        try:
            with self.outbox.open("rb") as f:
                f.seek(self._read_to)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        if not end:
            return
        self._read_to += end
        new = False
        for line in data[:end].splitlines():
            self._lines += 1
            e = _notified(line)
            # an outbox of older code names no disruption: each of its lines is a notice of its own
            if not e.disruption_id:
                self._anonymous = True
            told = self.notified[e.disruption_id or f"line {self._lines}"]
            if e.passenger_id not in told:
                told.add(e.passenger_id)
                new = True
        if new:
            self.last_new = time.monotonic()

    @property
    def last_notified(self) -> float:
        """When the last notice was written, on the clock of :attr:`first_status`."""
        return self.first_status + self.outbox.stat().st_mtime - self.first_status_wall

    async def _disruption(self, msg: Msg) -> None:
        self.disruptions.add(_disruption(msg.data).disruption_id)
        self.last_new = time.monotonic()

    async def _assessed(self, msg: Msg) -> None:
        e = _assessed(msg.data)
        self.assessed[e.disruption_id] = e.affected_passengers
        self.last_new = time.monotonic()

    async def _rejected(self, msg: Msg) -> None:
        self.rejected += 1
        self.last_new = time.monotonic()

    async def _heartbeat(self, msg: Msg) -> None:
        stats = _stats(msg.data)
        agent = msg.subject.removeprefix("busagents.stats.")
        pid = int(stats.instance.rpartition(":")[2])
        self.stats[agent][pid] = stats
        self.meter.ready(pid, agent)

    def handled(self, agent: str) -> int:
        return sum(s.handled for s in self.stats[agent].values())

    @property
    def affected(self) -> int:
        return sum(self.assessed.values())

    @property
    def told(self) -> int:
        return sum(len(told) for told in self.notified.values())

    def done(self) -> bool:
        return (
            self.handled("flight-monitor") >= self.expected
            and self.handled("flight-context") >= self.expected
            and self.disruptions.issubset(self.assessed)
            and (
                all(len(self.notified.get(d, ())) >= n for d, n in self.assessed.items())
                if not self._anonymous
                else self.told >= self.affected  # notices that name no disruption: count them all
            )
        )

    def summary(self) -> str:
        waiting = {d: n - len(self.notified.get(d, ())) for d, n in self.assessed.items()}
        waiting = {d: n for d, n in waiting.items() if n > 0}
        beats = {agent: len(pids) for agent, pids in sorted(self.stats.items())}
        return (
            f"status updates: {self.expected:,}, handled by flight-monitor "
            f"{self.handled('flight-monitor'):,}, flight-context {self.handled('flight-context'):,}; disruptions "
            f"{len(self.disruptions)}, assessed {len(self.assessed)}; notices in the outbox {self.told:,} for "
            f"{self.affected:,} affected; {sum(waiting.values()):,} passengers of "
            f"{len(waiting)} disruptions not notified; processes heartbeating per agent: {beats}"
        )

    async def until_serving(self, proc: asyncio.subprocess.Process, replicas: dict[str, int], cwd: Path) -> None:
        """Until every replica of every agent of the swarm (agent -> replicas) sent its first heartbeat (it serves)."""
        started = time.monotonic()
        while any(len(self.stats[a]) < n for a, n in replicas.items()):
            if proc.returncode is not None:
                what = f"swarm up exited with {proc.returncode} while starting"
                raise RuntimeError(f"{what}; {self.summary()}\n{_tail(cwd)}")
            if time.monotonic() - started > 180:
                raise RuntimeError(f"the swarm did not start within 180 s; {self.summary()}\n{_tail(cwd)}")
            await asyncio.sleep(0.2)

    async def until_done(self, proc: asyncio.subprocess.Process, cwd: Path, timeout: float) -> None:
        started = sampled = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            self.read_outbox()
            now = time.monotonic()
            if proc.returncode is not None:
                what = f"swarm up exited with {proc.returncode} during the run"
                raise RuntimeError(f"{what}; {self.summary()}\n{_tail(cwd)}")
            if now - sampled >= 1.0:
                self.meter.sample()
                sampled = now
            if self.done() and now - self.last_new >= QUIET:
                self.meter.sample()
                return
            if not self.meter.running and now - started > 180:
                raise RuntimeError(f"the swarm's feed did not start within 180 s; {self.summary()}\n{_tail(cwd)}")
            if now - started > timeout or (self.meter.running and now - self.last_new > STALL):
                what = f"after {now - started:.0f} s" if now - started > timeout else f"nothing new for {STALL:g} s"
                raise RuntimeError(f"the swarm's day did not finish ({what}): {self.summary()}\n{_tail(cwd)}")


def _swarm_file(replicas: dict[str, int]) -> str:
    """Every agent of ``replicas`` (the checkout's: one older than the concierge, such as the baseline,
    runs without it, as its demo does) with its number of replicas."""
    return "\n".join(f"[agents.{name}]\nreplicas = {n}\n" for name, n in replicas.items())


def _feed_file() -> str:
    return f"[agents.{FEED}]\nreplicas = 1\nrestart = false  # plays the day once\n"


async def _stop(proc: asyncio.subprocess.Process, timeout: float = 60.0) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


async def _swarm(
    day: _Day,
    replicas: int,
    timeout: float,
    *,
    cores: set[int] | None = None,
    extra_env: dict[str, str] | None = None,
    only: dict[str, int] | None = None,
) -> _Run:
    """The day played by the swarm with ``replicas`` of every agent (``only``: of these agents, the others
    at 1); with ``cores``, every process of the swarm (nats-server, ``swarm up`` and its replicas, the
    feed, the fresh context replica) runs on those; ``extra_env`` adds to every process's environment."""
    counts = {name: (only.get(name, 1) if only is not None else replicas) for name in day.agents}
    with contextlib.ExitStack() as stack:
        name = stack.enter_context(tempfile.TemporaryDirectory(prefix="busagents-bench-scaleout-"))
        with _on_cores(cores):
            server = stack.enter_context(NatsServer(scheduling=day.server_scheduling))
        tmp = Path(name)
        env = _env(day, tmp) | (extra_env or {})
        for part in day.store.parent.glob(day.store.name + "*"):  # the SQLite file and any -wal / -shm
            shutil.copy(part, Path(env["BUSAGENTS_FLIGHT_STORE"]).with_name(part.name))
        config, feed_config = tmp / "swarm.toml", tmp / "feed.toml"
        config.write_text(_swarm_file(counts))
        feed_config.write_text(_feed_file())
        assert server.process is not None
        watch = _Watch(_Meter({server.process.pid: SERVER}), day.status_updates, Path(env["BUSAGENTS_FLIGHT_OUTBOX"]))
        bus = await Bus.connect(server.url, name="bench-scaleout")
        up = ("-m", "busagents", "swarm", "up")
        try:
            await watch.subscribe(bus)
            started = time.perf_counter()
            with _on_cores(cores):
                proc = await _python(*up, str(config), "--nats", server.url, cwd=tmp, env=env)
            watch.meter.ready(proc.pid, SUPERVISOR)
            feed: asyncio.subprocess.Process | None = None
            try:
                # the day starts once every replica serves: a replica still starting up would spend its
                # start-up (generating the day, replaying the streams) inside the run
                await watch.until_serving(proc, counts, tmp)
                with _on_cores(cores):
                    feed = await _python(*up, str(feed_config), "--nats", server.url, cwd=tmp, env=env)
                watch.meter.ready(feed.pid, SUPERVISOR)
                await watch.until_done(proc, tmp, timeout)
                run_s = watch.last_notified - watch.first_status
                allowed = watch.meter.cores()
                watch.status = await _stored(bus, "travel.flight.status.FL0")
                ready_s, replay_s = await _fresh_context(bus, server.url, env, tmp, timeout, cores)
            finally:
                codes = [await _stop(p) for p in (feed, proc) if p is not None]
            wall = time.perf_counter() - started
        finally:
            await bus.close()
        if any(codes):
            raise RuntimeError(f"swarm up exited with {codes} when stopped (a replica did not drain):\n{_tail(tmp)}")
        audit = await _helper(
            "audit", env["BUSAGENTS_FLIGHT_STORE"], str(day.flights), "0", "0", cwd=tmp, stdin=day.cancelled
        )
    cpu = watch.meter.by_stage()
    stages = {stage: (watch.handled(stage), cpu.get(stage, 0.0)) for stage in STAGES}
    return _Run(
        run_s=run_s,
        wall_s=wall,
        affected=watch.affected,
        notified=watch.told,
        seat_conflicts=audit["seat_conflicts"],
        stranded=audit["stranded"],
        redecided=watch.rejected,
        dead_lettered=sum(s.dead_lettered for pids in watch.stats.values() for s in pids.values()),
        cpu_s=sum(cpu.values()),
        status_updates=watch.status,
        stages=stages,
        context_ready_s=ready_s,
        context_replay_s=replay_s,
        cores=allowed,
    )


async def _stored(bus: Bus, subject: str) -> int:
    """Messages stored in the stream of ``subject`` (0: no stream, as the feed of the code before issue 9)."""
    try:
        stream = await bus.js.find_stream_name_by_subject(subject)
    except nats.js.errors.NotFoundError:
        return 0
    info = await bus.js.stream_info(stream)
    return int(info.state.messages)


async def _fresh_context(
    bus: Bus, url: str, env: dict[str, str], tmp: Path, timeout: float, cores: set[int] | None
) -> tuple[float, float]:
    """Start one more flight-context once the day is over: seconds until it serves (its first heartbeat,
    sent once its views have replayed the streams), and the replay's share (from its log)."""
    beat: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pid = 0

    async def on_beat(msg: Msg) -> None:
        if _stats(msg.data).instance.endswith(f":{pid}") and not beat.done():
            beat.set_result(None)

    sub = await bus.nc.subscribe("busagents.stats.flight-context", cb=on_beat)
    log = tmp / "fresh-context.log"
    started = time.perf_counter()
    with log.open("wb") as out, _on_cores(cores):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "busagents", "--log-level", "INFO", "run", "flight-context", "--nats", url),
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    pid = proc.pid
    try:
        await asyncio.wait_for(beat, timeout)
        ready = time.perf_counter() - started
    finally:
        await sub.unsubscribe()
        await _stop(proc)
    found = re.search(r"views replayed in ([0-9.]+)s", log.read_text(errors="replace"))
    return ready, float(found.group(1)) if found else 0.0


def _outcomes(runs: list[_Run]) -> str:
    each = ", ".join(
        f"{r.affected:,}/{r.notified:,}/{r.seat_conflicts}/{r.stranded}/{r.redecided}/{r.dead_lettered}" for r in runs
    )
    cores = sorted({r.cores for r in runs if r.cores})
    on = f"; its processes on {'/'.join(map(str, cores))} core(s)" if cores else ""
    return f"affected/notified/seat conflicts/stranded/re-decisions/dead letters: {each}{on}"


def _results(runs: dict[int, list[_Run]], agents: tuple[str, ...]) -> list[Result]:
    single = [r.run_s for r in runs[0]]
    out: list[Result] = []
    for mode, label in LABELS.items():
        rs = runs.get(mode, [])
        if not rs:
            continue
        cpu = (
            f"the demo and its nats-server after it started; the whole command: "
            f"{median(r.whole_cpu_s for r in rs):.1f} CPU-s"
            if mode == 0
            else f"all processes: {median(r.cpu_s for r in rs):.1f} CPU-s"
        )
        out += [
            Result(
                NAME,
                f"{label}: run time",
                "s",
                [r.run_s for r in rs],
                higher_is_better=False,
                ratio=median(ratios([r.run_s for r in rs], single)) if mode != BASELINE else None,
                note=_outcomes(rs),
            ),
            Result(NAME, f"{label}: wall time of the command", "s", [r.wall_s for r in rs], higher_is_better=False),
            Result(
                NAME,
                f"{label}: CPU per affected passenger",
                "CPU-ms",
                [r.cpu_ms_per_affected for r in rs],
                higher_is_better=False,
                note=cpu,
            ),
        ]
        if mode in (0, BASELINE):
            continue
        out.append(
            Result(
                NAME,
                f"{label}: a fresh flight-context replica after the day, start to serving queries",
                "s",
                [r.context_ready_s for r in rs],
                higher_is_better=False,
                note=f"of which replaying the streams: {median(r.context_replay_s for r in rs):.2f} s",
            )
        )
        for stage in STAGES:
            if stage in AGENTS and stage not in agents:
                continue
            ms = median(1000 * r.stages[stage][1] / max(r.affected, 1) for r in rs)
            if stage == FEED:
                count = f"{median(r.status_updates for r in rs):,.0f} status updates published, "
            elif stage in AGENTS:
                count = f"{median(r.stages[stage][0] for r in rs):,.0f} msgs handled, "
            else:
                count = ""
            out.append(
                Result(
                    NAME,
                    f"{label}: {stage}",
                    "CPU-s",
                    [r.stages[stage][1] for r in rs],
                    higher_is_better=False,
                    note=f"{count}{ms:.3f} CPU-ms per affected passenger",
                )
            )
    return out


def _checks(runs: dict[int, list[_Run]]) -> list[Check]:
    run_s = {mode: [r.run_s for r in rs] for mode, rs in runs.items() if rs and mode != BASELINE}
    cpu_ms = {mode: median(r.cpu_ms_per_affected for r in rs) for mode, rs in runs.items() if rs}
    served = [r.served for mode, rs in runs.items() if mode != BASELINE for r in rs]
    medians = ", ".join(f"{LABELS[mode]} {median(s):.1f} s" for mode, s in run_s.items())
    if BASELINE in cpu_ms:  # measured in this run, on this machine
        before = cpu_ms[BASELINE]
        measured = (
            f"the swarm with 1 replica of the code before the scale-out work (commit {BASELINE_COMMIT}), "
            f"measured in this run (median of {len(runs[BASELINE])})"
        )
    else:
        before, measured = BASELINE_CPU_MS_PER_AFFECTED, f"the swarm with 1 replica measured {BASELINE_MEASURED}"
    return [
        Check(
            "Flight day run time, swarm with 2 replicas of every agent / single process",
            median(ratios(run_s[2], run_s[0])),
            0.6,
            at_least=False,
            detail=f"medians: {medians}",
        ),
        Check(
            "Flight day run time, swarm with 1 replica of every agent: on every core / on one core",
            median(ratios(run_s[1], run_s[ONE_CORE])),
            0.6,
            at_least=False,
            detail=f"{os.cpu_count()} cores; 2 replicas on every core / 1 replica on one core: "
            f"{median(ratios(run_s[2], run_s[ONE_CORE])):.2f}",
        ),
        Check(
            "CPU-ms per affected passenger, swarm with 2 replicas (all processes, day generation excluded)",
            cpu_ms[2],
            before / 2,
            at_least=False,
            detail=f"half of {before:.3f} ms, {measured}; now 1 replica {cpu_ms[1]:.3f} ms, single process "
            f"{cpu_ms[0]:.3f} ms",
        ),
        Check(
            "Scale-out runs with notified == affected, 0 seat conflicts, 0 stranded, 0 dead letters (share)",
            sum(served) / len(served),
            1.0,
            at_least=True,
            detail=f"{sum(served)} of {len(served)} runs",
        ),
    ]


async def run(
    *, flights: int, passengers: int, reps: int, baseline: bool = True
) -> tuple[list[Result], list[Check], str]:
    """The four ways, ``reps`` times; with ``baseline``, the swarm of the code before the scale-out work
    at 1 replica in each repetition too (when this repository's history has it)."""
    timeout = max(300.0, passengers / 250)
    runs: dict[int, list[_Run]] = {mode: [] for mode in LABELS}
    with tempfile.TemporaryDirectory(prefix="busagents-bench-scaleout-") as tmp:
        for part in ("day", "baseline-day"):
            (Path(tmp) / part).mkdir()
        day = await _prepare(flights, passengers, Path(tmp) / "day")
        before: _Day | None = None
        if baseline:
            root = _baseline_checkout(Path(tmp))
            if root is not None:
                code = f"commit {BASELINE_COMMIT}, extracted from this repository's history"
                before = await _prepare(flights, passengers, Path(tmp) / "baseline-day", root=root, code=code)
        one_core = {min(os.sched_getaffinity(0))}
        for rep in range(reps):
            modes = [0, 1, 2, ONE_CORE, BASELINE] if before is not None else [0, 1, 2, ONE_CORE]
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                if mode == 0:
                    runs[mode].append(await _single(day, timeout))
                else:
                    cores = one_core if mode == ONE_CORE else None
                    which = before if mode == BASELINE else day
                    assert which is not None
                    runs[mode].append(await _swarm(which, REPLICAS[mode], timeout, cores=cores))
    method = METHOD.format(
        flights=flights,
        passengers=passengers,
        seed=SEED,
        status_updates=day.status_updates,
        code=day.code,
        agents=", ".join(f"`{a}`" for a in day.agents),  # the measured checkout's agents
        feed=FEED,
        quiet=QUIET,
        baseline=f"{BASELINE_CPU_MS_PER_AFFECTED:.3f} CPU-ms, {BASELINE_MEASURED}",
        baseline_commit=BASELINE_COMMIT,
    )
    return _results(runs, day.agents), _checks(runs), method
