"""Ctrl-C in a terminal (SIGINT to the whole process group) drains the agents before the server stops.

Each command runs in its own session, as a shell's foreground job does, and gets SIGINT on its
process group, as a terminal sends it: the command, its replicas and (before the fix) the
embedded nats-server all received it at once, so the server died under agents still draining.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path

import msgspec

from busagents import Bus

from .drain_agent import Done, Job, Started, child_env

DRAIN_TIMEOUT = 10.0
JOBS = 4


def interrupted_env(tmp_path: Path) -> dict[str, str]:
    """No NATS configured and no busagents server recorded: the command embeds its own server."""
    env = child_env()
    env.pop("BUSAGENTS_NATS_URL", None)
    env["BUSAGENTS_DATA_DIR"] = str(tmp_path / "data")
    env["BUSAGENTS_DRAIN_TIMEOUT"] = str(DRAIN_TIMEOUT)
    return env


async def interrupt_with_work_in_hand(*args: str, env: dict[str, str], replicas: int) -> tuple[int, str, float]:
    """Run ``busagents ARGS``, give its ``replicas`` replicas of ``slow`` work, SIGINT its process group
    while every job is in hand; every job must still be done. Returns exit code, stderr, seconds to exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", *args, env=env, stderr=asyncio.subprocess.PIPE, start_new_session=True
    )
    assert proc.stderr is not None
    lines: list[str] = []
    bus: Bus | None = None
    try:
        url = await asyncio.wait_for(_server_url(proc.stderr, lines), 30)
        reader = asyncio.create_task(_read_all(proc.stderr, lines))
        bus = await Bus.connect(url, name="ctrl-c-test")
        await _until_serving(bus, replicas)
        async with bus.expect(Started, count=JOBS, timeout=10):
            for n in range(JOBS):
                await bus.publish(Job(n=n))
        async with bus.expect(Done, count=JOBS, timeout=DRAIN_TIMEOUT) as done:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            interrupted = time.monotonic()
        assert sorted(m.body.n for m in done.messages) == list(range(JOBS))
        code = await asyncio.wait_for(proc.wait(), DRAIN_TIMEOUT + 20)
        elapsed = time.monotonic() - interrupted
        await reader
    finally:
        if bus is not None:
            await bus.close()
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return code, "".join(lines), elapsed


async def _server_url(stream: asyncio.StreamReader, lines: list[str]) -> str:
    while line := (await stream.readline()).decode():
        lines.append(line)
        if found := re.match(r"nats: embedded nats-server on (nats://127\.0\.0\.1:\d+) for this command only ", line):
            return found.group(1)
    raise AssertionError("no embedded nats-server announced:\n" + "".join(lines))


async def _read_all(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := (await stream.readline()).decode():
        lines.append(line)


async def _until_serving(bus: Bus, replicas: int) -> None:
    stats = await bus.nc.subscribe("busagents.stats.slow")
    instances: set[str] = set()
    try:
        while len(instances) < replicas:
            beat = await stats.next_msg(timeout=20)
            instances.add(msgspec.json.decode(beat.data)["instance"])
    finally:
        await stats.unsubscribe()


def assert_clean(code: int, err: str, elapsed: float) -> None:
    assert code == 0, err
    assert "Traceback" not in err, err
    assert "WARNING" not in err and "ERROR" not in err, err  # no reconnect warnings, no lost connections
    assert elapsed < DRAIN_TIMEOUT, (elapsed, err)


async def test_ctrl_c_to_swarm_up_drains_every_replica_before_the_embedded_server_stops(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\nreplicas = 2\n')
    code, err, elapsed = await interrupt_with_work_in_hand(
        "swarm", "up", str(swarm), env=interrupted_env(tmp_path), replicas=2
    )
    assert_clean(code, err, elapsed)
    assert err.count("stopped (exit 0)") == 2, err
    print(f"swarm up: exit {code} {elapsed:.1f}s after SIGINT to its process group")


async def test_ctrl_c_to_run_with_two_replicas_drains_both_before_the_embedded_server_stops(tmp_path: Path) -> None:
    code, err, elapsed = await interrupt_with_work_in_hand(
        "--log-level", "INFO", "run", "drain_agent:Slow", "--replicas", "2", env=interrupted_env(tmp_path), replicas=2
    )
    assert_clean(code, err, elapsed)
    assert err.count("INFO busagents.worker: worker drained") == 2, err
    print(f"run --replicas 2: exit {code} {elapsed:.1f}s after SIGINT to its process group")


async def test_ctrl_c_to_demo_with_agent_processes_drains_them_and_exits_0(tmp_path: Path) -> None:
    env = interrupted_env(tmp_path)
    args = ("demo", "--processes", "--day-seconds", "30", "--no-live", "--timeout", "60")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", *args),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):  # the agent processes are at work: a booking was changed
            while not re.match(r"\s+(rebooked|refunded) ", line := (await proc.stdout.readline()).decode()):
                assert line, "".join(seen)
                seen.append(line)
        os.killpg(proc.pid, signal.SIGINT)
        interrupted = time.monotonic()
        out, err = await asyncio.wait_for(proc.communicate(), 40)
        elapsed = time.monotonic() - interrupted
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    text, errors = out.decode(), err.decode()
    assert proc.returncode == 0, errors + text
    assert "Traceback" not in errors and "WARNING" not in errors and "ERROR" not in errors, errors
    assert "interrupted before the day settled; every agent drained" in text, text
    assert re.search(r"dead_lettered: 0\n", text), text
    assert elapsed < 30, elapsed  # the demo's drain timeout
    print(f"demo --processes: exit 0 {elapsed:.1f}s after SIGINT to its process group")
