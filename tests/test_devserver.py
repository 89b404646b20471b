"""``busagents server start|status|stop``: a development server that keeps its data between runs."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import msgspec
from click.testing import CliRunner

from busagents import Bus, devserver
from busagents.cli import cli
from busagents.process import pid_alive
from busagents.server import NatsServer


class Count(msgspec.Struct):
    n: int


async def server_cli(command: str, data: Path, *, process: bool = False) -> tuple[int, str]:
    """``busagents server COMMAND --data-dir DATA``: exit code and output; in this process unless ``process``."""
    args = ("server", command, "--data-dir", str(data))
    if not process:
        result = await asyncio.to_thread(CliRunner().invoke, cli, args)
        return result.exit_code, result.output
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_server_start_status_stop_and_its_state_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert await server_cli("status", data) == (1, f"not running (no server recorded in {data})\n")

    code, out = await server_cli("start", data, process=True)
    assert code == 0, out
    record = devserver.recorded(data)
    assert record is not None and record.running  # it outlives the command that started it
    assert out.startswith(f"started: {record.url} (pid {record.pid}, busagents server, started "), out
    assert (await server_cli("start", data))[1].startswith(f"already running: {record.url}")
    code, out = await server_cli("status", data)
    assert code == 0 and out.startswith(f"running: {record.url} (pid {record.pid}, "), out

    bus = await Bus.connect(record.url)
    try:
        counts = await bus.state("devserver-test", Count)
        await counts.put("k", Count(41))
    finally:
        await bus.close()

    code, out = await server_cli("stop", data)
    assert (code, out) == (0, f"stopped: {record.url} (pid {record.pid}); data kept in {data}\n")
    assert not pid_alive(record.pid)
    assert devserver.recorded(data) is None
    code, out = await server_cli("status", data)
    assert code == 1 and out.startswith("not running"), out

    code, out = await server_cli("start", data)
    assert code == 0, out
    again = devserver.recorded(data)
    assert again is not None and again.pid != record.pid
    try:
        bus = await Bus.connect(again.url)
        try:
            counts = await bus.state("devserver-test", Count)
            assert await counts.get("k") == Count(41)  # JetStream kept it in the data directory
        finally:
            await bus.close()
    finally:
        code, out = await server_cli("stop", data)
    assert code == 0 and re.match(r"stopped: nats://127\.0\.0\.1:\d+ ", out), out


async def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path: Path, nats_server: NatsServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", "server", "start", "--data-dir", str(tmp_path), "--port", str(nats_server.port)),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode() == (
        f"error: the busagents server did not start: Error listening on port: 127.0.0.1:{nats_server.port}, "
        f'"listen tcp 127.0.0.1:{nats_server.port}: bind: address already in use" '
        f"(log: {tmp_path / 'nats' / 'nats-server.log'})\n"
    )
    assert devserver.recorded(tmp_path) is None
