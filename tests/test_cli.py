"""The command line: help, plugin listing, clear errors without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from busagents import Bus
from busagents.server import NatsServer

from .drain_agent import child_env, run_until_serving


def nats(server: NatsServer) -> tuple[str, str]:
    return ("--nats", server.url)


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
    # two heartbeating instances (each is agent@host:pid): two processes
    code, err = await run_until_serving(
        bus, "run", "drain_agent:Slow", "--replicas", "2", *nats(nats_server), replicas=2
    )
    assert code == 0, err
    assert "started 2 replicas" in err


async def test_run_with_replicas_passes_the_log_level_to_the_replicas(nats_server: NatsServer, bus: Bus) -> None:
    code, text = await run_until_serving(
        bus, "--log-level", "info", "run", "drain_agent:Slow", "--replicas", "2", *nats(nats_server), replicas=2
    )
    assert code == 0, text
    # Only replicas run a worker: each of the two logs its start and its drain at INFO.
    assert text.count("INFO busagents.worker: worker started: slow") == 2, text
    assert text.count("INFO busagents.worker: worker drained") == 2, text


@pytest.mark.parametrize(
    ("env_level", "flag", "info", "debug"),
    [
        ("DEBUG", None, True, True),
        ("info", None, True, False),
        (None, None, False, False),
        ("INFO", "WARNING", False, False),
    ],
    ids=["env-debug", "env-info", "default-warning", "flag-wins"],
)
async def test_log_level_comes_from_the_flag_else_busagents_log_level_else_warning(
    nats_server: NatsServer, bus: Bus, env_level: str | None, flag: str | None, info: bool, debug: bool
) -> None:
    env = child_env()
    env.pop("BUSAGENTS_LOG_LEVEL", None)
    if env_level is not None:
        env["BUSAGENTS_LOG_LEVEL"] = env_level
    level = ["--log-level", flag] if flag else []
    code, text = await run_until_serving(
        bus, *level, "run", "drain_agent:Slow", *nats(nats_server), replicas=1, env=env
    )
    assert code == 0, text
    assert ("INFO busagents.worker: worker started: slow" in text) is info, text
    assert ("DEBUG asyncio: Using selector" in text) is debug, text


@pytest.mark.parametrize(("args", "env_level"), [(("--log-level", "loud"), "INFO"), ((), "loud")], ids=["flag", "env"])
def test_an_invalid_log_level_is_a_usage_error(args: tuple[str, ...], env_level: str) -> None:
    result = busagents(*args, "agents", "list", env={**os.environ, "BUSAGENTS_LOG_LEVEL": env_level})
    assert result.returncode == 2
    assert "Invalid value for '--log-level'" in result.stderr
    assert "'loud' is not one of" in result.stderr
    assert "Traceback" not in result.stderr


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
    for taken in ("json", "busagents", "msgspec"):
        clash = busagents("new", taken, "--dir", str(tmp_path / taken))
        assert clash.returncode == 1, taken
        assert f"would be imported as {taken!r}, which is already a module here" in clash.stderr


def test_agents_list_says_when_a_plugin_runs_under_another_agent_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    from click.testing import CliRunner

    from busagents import plugins
    from busagents.cli import agents, cli

    found = {
        "seatkeeper": EntryPoint("seatkeeper", "tests.drain_agent:Slow", plugins.AGENTS_GROUP),  # Slow.name == "slow"
        "slow": EntryPoint("slow", "tests.drain_agent:Slow", plugins.AGENTS_GROUP),
    }
    monkeypatch.setattr(plugins, "available_agents", lambda: found)  # real entry points, not installed ones
    monkeypatch.setattr(agents, "available_agents", lambda: found)
    result = CliRunner().invoke(cli, ["agents", "list"])
    assert result.exit_code == 0, result.output
    assert "runs as agent 'slow' (set name = 'seatkeeper' on Slow to match)" in result.output
    assert result.output.count("runs as agent") == 1  # not for the plugin whose name matches


def test_run_refuses_replicas_of_a_singleton_agent() -> None:
    from click.testing import CliRunner

    from busagents import ConfigError
    from busagents.cli import cli

    # the refusal comes before NATS: with the check missing, this unreachable URL would be the error
    args = ["run", "tests.test_swarm:Ledger", "--replicas", "2", "--nats", "nats://127.0.0.1:1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError), result.exception
    assert str(result.exception) == (
        "tests.test_swarm:Ledger declares singleton = True (it must run as one instance) "
        "but --replicas 2 was given; run it with --replicas 1"
    )


@pytest.mark.parametrize(("setting", "expected"), [(None, 20_000), ("5000", 5_000), ("0", 700)])
async def test_an_agent_process_collects_its_youngest_generation_as_set(
    nats_server: NatsServer, bus: Bus, tmp_path: Path, setting: str | None, expected: int
) -> None:
    """``busagents run`` sets the youngest generation's threshold before the agent is built (0: Python's
    700 is left); a threshold below 0 is refused with the setting named, no traceback."""
    env = {**child_env(), "GC_REPORT": str(tmp_path / "gc")}
    env.pop("BUSAGENTS_GC_THRESHOLD", None)
    if setting is not None:
        env["BUSAGENTS_GC_THRESHOLD"] = setting
    code, err = await run_until_serving(
        bus, "run", "drain_agent:SlowReportingGc", *nats(nats_server), replicas=1, env=env
    )
    assert code == 0, err
    assert int((tmp_path / "gc").read_text()) == expected
    refused = busagents("run", "drain_agent:Slow", *nats(nats_server), env={**env, "BUSAGENTS_GC_THRESHOLD": "-1"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "invalid Settings gc_threshold='-1': Input should be greater than or equal to 0" in refused.stderr


def test_the_command_line_leaves_the_swarm_security_libraries_to_the_commands_that_use_them() -> None:
    """Every agent process of a swarm is a ``busagents run``: the CLI it loads does not import
    ``cryptography`` (13 MB of resident memory in each), which only ``swarm secure`` and
    ``swarm up --secure`` need."""
    heavy = "('cryptography', 'busagents.swarm.secure')"
    code = f"import sys, busagents.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
