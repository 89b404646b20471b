"""An agent run as a real OS process by the drain, replicas and swarm tests (``busagents run drain_agent:Slow``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import select
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from busagents import Agent, Bus, Context, event, on


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


class Waiter(Agent):
    """An agent that says it answers people as they wait (``swarm up`` leaves it the normal scheduling)."""

    name = "waiter"
    interactive = True


def child_env() -> dict[str, str]:
    """The environment of a ``busagents`` child process that imports ``drain_agent`` and heartbeats fast."""
    return {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
    }


async def run_until_serving(bus: Bus, *args: str, replicas: int, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m busagents ARGS`` until ``replicas`` processes of ``slow`` heartbeat, then SIGTERM.

    Returns its exit code and its stderr (it must exit within 30 s of the signal).
    """
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", *args, env=env or child_env(), stderr=asyncio.subprocess.PIPE
    )
    instances: set[str] = set()
    try:
        async with reaped(proc):
            while len(instances) < replicas:
                beat = await stats.next_msg(timeout=20)
                instances.add(msgspec.json.decode(beat.data)["instance"])
            _, err = await sigterm(proc)
    finally:
        await stats.unsubscribe()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@contextlib.asynccontextmanager
async def reaped(proc: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    """The child process, killed and waited for if it still runs when the block ends (a test that failed)."""
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def sigterm(proc: asyncio.subprocess.Process, timeout: float = 30.0) -> tuple[bytes, bytes]:
    """SIGTERM to the child, then its stdout and stderr (those it was given pipes for) once it exited."""
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return out or b"", err or b""


def exited(pids: list[int], timeout: float = 20.0) -> list[int]:
    """Wait until every pid has ended or ``timeout`` passed; return the pids still running.

    Event-driven on Linux: a pidfd becomes readable the moment its process ends (zombie or
    not), so this blocks in ``select`` instead of polling. These are not our children (their
    parent was killed), so ``waitpid`` cannot wait for them.
    """
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # already gone
                fds[os.pidfd_open(pid)] = pid
        deadline = time.monotonic() + timeout
        while fds and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(fds), [], [], left)
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


class SlowReportingGc(Slow):
    """``Slow``, writing its process's young-generation threshold (``gc.get_threshold()[0]``) to the
    file ``$GC_REPORT`` when it starts."""

    name = "slow"  # heartbeats as Slow's

    async def on_start(self, ctx: Context) -> None:
        report = Path(os.environ["GC_REPORT"])
        await asyncio.to_thread(report.write_text, str(gc.get_threshold()[0]))
