"""A SIGKILLed ``run --replicas`` parent or ``swarm up`` supervisor leaves no process behind (Linux)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import msgspec
import psutil
import pytest

from busagents import Bus
from busagents.server import NatsServer

from .drain_agent import child_env, exited

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaped yet has exited)."""
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def left_then_swept(store: Path) -> tuple[bool, bool]:
    """Whether ``store`` exists now, and still exists once another embedded server has started."""
    before = store.exists()
    with NatsServer():
        return before, store.exists()


async def line_matching(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 20)).decode()
        if not line:
            raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")
        seen.append(line)
        if match := re.search(pattern, line):
            return match


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


async def test_replicas_exit_when_the_run_parent_is_sigkilled(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    with (tmp_path / "stderr").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "busagents", "run", "drain_agent:Slow", "--replicas", "2", "--nats", nats_server.url),
            env=child_env(),
            stderr=err,
        )
    replicas: set[int] = set()
    try:
        while len(replicas) < 2:
            beat = await stats.next_msg(timeout=20)
            replicas.add(int(msgspec.json.decode(beat.data)["instance"].rsplit(":", 1)[1]))
        assert all(psutil.Process(p).ppid() == proc.pid for p in replicas)
        proc.kill()
        await proc.wait()
        left = await asyncio.to_thread(exited, sorted(replicas))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        kill_all(sorted(replicas))
        await stats.unsubscribe()
    assert left == [], f"replicas {left} outlived their SIGKILLed parent"


async def test_swarm_replicas_and_embedded_server_exit_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\nreplicas = 2\n')
    env = child_env()
    env.pop("BUSAGENTS_NATS_URL", None)  # no URL anywhere: swarm up starts its embedded server
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *("-m", "busagents", "swarm", "up", str(swarm)), env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    seen: list[str] = []
    children: list[int] = []
    try:
        await line_matching(proc.stderr, r"^nats: embedded nats-server on ", seen)
        replicas = [int((await line_matching(proc.stderr, rf"started slow\[{i}\] pid (\d+)", seen))[1]) for i in (0, 1)]
        (server,) = [p for p in psutil.Process(proc.pid).children() if p.pid not in replicas]
        store = Path(server.cmdline()[server.cmdline().index("-sd") + 1])  # its JetStream store
        server_pid = int((store / "busagents-owner").read_text().split()[1])
        children = [*replicas, server_pid]
        assert sorted(c.pid for c in psutil.Process(proc.pid).children()) == sorted(children)
        proc.kill()
        await proc.wait()
        left = await asyncio.to_thread(exited, children)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        kill_all(children)
        await asyncio.wait_for(proc.stderr.read(), 20)  # EOF once every child holding the pipe is gone
    assert left == [], f"{left} outlived the SIGKILLed supervisor (replicas {replicas}, nats-server {server_pid})"
    # nats-server cannot remove its own store; the next embedded server does, its owners being gone.
    assert await asyncio.to_thread(left_then_swept, store) == (True, False)
