"""The command line: help, plugin listing, clear errors without tracebacks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgspec

from busagents import Bus
from busagents.server import NatsServer

from .drain_agent import child_env


def busagents(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "busagents", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_help_lists_the_commands() -> None:
    result = busagents("--help")
    assert result.returncode == 0
    for command in ("agents", "run", "demo"):
        assert command in result.stdout


def test_unknown_agent_is_a_clear_error_not_a_traceback() -> None:
    result = busagents("run", "no-such-agent", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "no agent plugin named 'no-such-agent'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_nats_is_a_clear_error() -> None:
    result = busagents("run", "busagents.agent:Agent", "--nats", "nats://127.0.0.1:1")
    assert result.returncode == 1
    assert "no NATS reachable at nats://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_url_that_is_not_a_nats_url_is_a_clear_error() -> None:
    for url in ("http://127.0.0.1:4222", "nats://127.0.0.1:port", "nats://:4222"):
        result = busagents("run", "busagents.agent:Agent", "--nats", url)
        assert result.returncode == 1, url
        assert f"invalid NATS URL '{url}'" in result.stderr
        assert "Traceback" not in result.stderr


def test_the_cli_does_not_import_the_anthropic_sdk_until_a_model_is_used() -> None:
    # Every agent process is started by this CLI; the SDK would add ~45 MB to each of them.
    probe = "import sys, busagents.cli, busagents.llm; print('anthropic' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
    loaded = "import sys, busagents.llm as l; l.Decider; print('anthropic' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr


def test_bad_option_is_a_usage_error() -> None:
    result = busagents("run", "x", "--replicas", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


async def test_run_with_replicas_starts_that_many_processes_that_share_a_queue_group(
    nats_server: NatsServer, bus: Bus
) -> None:
    env = child_env()
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", "run", "drain_agent:Slow", "--replicas", "2", "--nats", nats_server.url),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    instances: set[str] = set()
    try:
        while len(instances) < 2:
            beat = await stats.next_msg(timeout=20)
            instances.add(msgspec.json.decode(beat.data)["instance"])
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await stats.unsubscribe()
    assert len(instances) == 2  # two processes, each with its own pid
    assert proc.returncode == 0, err.decode()
    assert "started 2 replicas" in err.decode()


def test_new_scaffolds_a_plugin_whose_test_passes(tmp_path: Path) -> None:
    target = tmp_path / "heat-watch"
    made = busagents("new", "heat-watch", "--dir", str(target))
    assert made.returncode == 0, made.stderr
    pyproject = (target / "pyproject.toml").read_text()
    assert 'heat-watch = "heat_watch.agent:HeatWatchAgent"' in pyproject
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target / "tests")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=target,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    again = busagents("new", "heat-watch", "--dir", str(target))
    assert again.returncode == 1
    assert "not empty" in again.stderr
