"""``busagents run --reload``: the agent process starts again when its source changes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import psutil

from busagents import Bus, query
from busagents.server import NatsServer

from .drain_agent import reaped

AGENT = """
import msgspec
from busagents import Agent, Context, on, query


class Version(msgspec.Struct):
    text: str


@query("test.reload.version", reply=Version)
class WhichVersion(msgspec.Struct):
    pass


class Versioned(Agent):
    name = "reload-versioned"

    @on(WhichVersion)
    async def which(self, q: WhichVersion, ctx: Context) -> Version:
        return Version(text="{text}")
"""


class Version(msgspec.Struct):
    text: str


@query("test.reload.version", reply=Version)
class WhichVersion(msgspec.Struct):
    pass


async def test_reload_restarts_the_agent_with_the_changed_source(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    module = tmp_path / "versioned_agent.py"
    module.write_text(AGENT.format(text="first"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2"}
    stats = await bus.nc.subscribe("busagents.stats.reload-versioned")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "run", "versioned_agent:Versioned", "--reload"),
        *("--nats", nats_server.url),
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # a process group of its own, as a shell gives it
        # and Ctrl-C inherited ignored, as a shell gives its background jobs: it must stop the watch anyway
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stderr=asyncio.subprocess.PIPE,
    )

    async def next_instance(not_this: str | None) -> str:
        while True:
            instance: str = msgspec.json.decode((await stats.next_msg(timeout=30)).data)["instance"]
            if instance != not_this:
                return instance

    assert proc.stderr is not None
    said: list[str] = []  # read as it comes: when the command hangs, the test says what it printed

    async def read(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            said.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read(proc.stderr))
    try:
        async with reaped(proc):
            first = await next_instance(None)
            assert await bus.request(WhichVersion()) == Version(text="first")
            module.write_text(AGENT.format(text="second"))
            await next_instance(first)  # another process: the agent was started again
            assert await bus.request(WhichVersion()) == Version(text="second")
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
            try:  # the agent drains (SIGTERM from the watcher) within seconds; 60 s is a hang, said in full
                await asyncio.wait_for(asyncio.gather(proc.wait(), reader), 60)
            except TimeoutError:
                alive = [f"{c.pid} {c.cmdline()}" for c in psutil.Process(proc.pid).children(recursive=True)]
                raise AssertionError(f"no exit 60 s after SIGINT; children {alive}; stderr:\n{''.join(said)}") from None
    finally:
        reader.cancel()
        await stats.unsubscribe()
    text = "".join(said)
    assert f"--reload: watching {tmp_path}" in text
    assert "--reload: versioned_agent.py changed; restarting versioned_agent:Versioned" in text
    assert "Traceback" not in text, text
    assert proc.returncode == 0, text
