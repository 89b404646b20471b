"""The command line: help, plugin listing, clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys


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


def test_bad_option_is_a_usage_error() -> None:
    result = busagents("run", "x", "--replicas", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
