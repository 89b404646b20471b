"""Swarm files without surprises: misplaced keys, the README reference, refusing errors, names, the data directory."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import sys
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from busagents import Bus, ConfigError
from busagents.server import NatsServer
from busagents.swarm import load_swarm
from busagents.swarm.config import AGENT_KEYS, SWARM_KEYS

from .drain_agent import Done, Job, child_env, reaped, sigterm

README = Path(__file__).parent.parent / "README.md"
ASKER = "asker_agent:Asker"  # sends a query nobody in its swarm answers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[agents.a]\nmax_restarts = 3\n",
            "agents.a.max_restarts: max_restarts is a swarm-level key ([swarm]), not an agent key; "
            "move it from [agents.a] to the [swarm] table",
        ),
        (
            "replicas = 2\n[agents.a]\n",
            "replicas: replicas is an agent key ([agents.NAME]), not a swarm-level key; "
            "set it in the [agents.NAME] table of each agent it is for",
        ),
        (
            "[agents.a]\nreplica = 2\n",
            "agents.a.replica: unknown agent key 'replica' (did you mean 'replicas'?); "
            "an agent's keys are agent, replicas, env, restart",
        ),
        (
            "[swarm]\nrestart_windows = 9\n[agents.a]\n",
            "restart_windows: unknown swarm key 'restart_windows' (did you mean 'restart_window'?); "
            "the swarm's keys are nats_url, max_restarts, restart_window, server_scheduling",
        ),
        (
            "max_restarts = 1\n[swarm]\nmax_restarts = 3\n[agents.a]\n",
            "max_restarts set both in [swarm] and at the top",
        ),
        ("[agent.a]\n", "agents are [agents.NAME] tables (agents, plural), not [agent.NAME]"),
    ],
)
def test_a_misplaced_key_says_where_it_belongs(tmp_path: Path, text: str, message: str) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_swarm(swarm)
    assert message in str(raised.value)
    assert "Extra inputs are not permitted" not in str(raised.value)


def test_the_swarm_table_holds_the_swarm_keys(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[swarm]\nmax_restarts = 2\nnats_url = "nats://127.0.0.1:4333"\n[agents.a]\nreplicas = 3\n')
    config = load_swarm(swarm)
    assert (config.max_restarts, config.nats_url, config.agents["a"].replicas) == (2, "nats://127.0.0.1:4333", 3)


def test_the_readme_reference_names_every_key_of_the_swarm_file() -> None:
    text = README.read_text()
    section = text[text.index("### Swarm file reference") :]
    end = re.search(r"\n#{1,3} ", section)
    assert end is not None
    section = section[: end.start()]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == {*SWARM_KEYS, *AGENT_KEYS}  # every key of the model, and no key it does not have


def swarm_file(tmp_path: Path) -> Path:
    """The reference rebooker and notifier (they write files), and an agent under another key, asking a query
    nobody answers (an error for 'swarm check')."""
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(f'[agents.flight-rebooker]\n[agents.flight-notifier]\n[agents.questions]\nagent = "{ASKER}"\n')
    return swarm


def swarm_env() -> dict[str, str]:
    return {**child_env(), "BUSAGENTS_FLIGHT_FLIGHTS": "4", "BUSAGENTS_FLIGHT_PASSENGERS": "40"}


async def test_swarm_up_refuses_a_swarm_whose_check_reports_errors(tmp_path: Path, nats_server: NatsServer) -> None:
    swarm, data = swarm_file(tmp_path), tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "swarm", "up", str(swarm), "--nats", nats_server.url),
        *("--data-dir", str(data)),
        env=swarm_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    async with reaped(proc):
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    assert "error: query AskQuote is sent by ['asker'] but nobody answers" in text
    assert "'swarm check' reports 1 error(s) (listed above)" in text
    assert "or start the swarm anyway with --force" in text
    assert "started" not in text and not data.exists()  # nothing was started
    assert "Traceback" not in text


async def test_swarm_up_force_starts_it_warns_of_keys_that_are_not_names_and_writes_only_in_its_data_dir(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    swarm, data, cwd = swarm_file(tmp_path), tmp_path / "data", tmp_path / "cwd"
    cwd.mkdir()
    names = {"flight-rebooker", "flight-notifier", "asker"}
    stats = await bus.nc.subscribe("busagents.stats.*")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "swarm", "up", str(swarm), "--nats", nats_server.url),
        *("--data-dir", str(data), "--force"),
        cwd=cwd,
        env=swarm_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with reaped(proc):
            serving: set[str] = set()
            while serving != names:
                serving.add(msgspec.json.decode((await stats.next_msg(timeout=30)).data)["agent"])
            out, err = await sigterm(proc, 40)
    finally:
        await stats.unsubscribe()
    text = err.decode()
    assert proc.returncode == 0, text
    assert "error: query AskQuote is sent by ['asker'] but nobody answers" in text
    assert "--force: starting the swarm despite 1 error(s)" in text
    assert (
        "warning: agents.questions runs agent 'asker' (Asker.name): its permissions, graph entries, queue group, "
        "dead letters and stats go by 'asker', not 'questions'; name the table [agents.asker] to match"
    ) in text
    assert f"data directory: {data}\n" in text
    assert sorted(os.listdir(cwd)) == []  # nothing written where it was started
    assert {"bookings.sqlite3", "outbox.jsonl"} <= set(os.listdir(data))
    assert out == b""  # no live view when stdout is not a terminal


def test_swarm_check_warns_when_a_key_is_not_the_agents_name(tmp_path: Path) -> None:
    from busagents.cli import cli

    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.rebooker]\nagent = "flight-rebooker"\n')
    result = CliRunner().invoke(cli, ["swarm", "check", str(swarm)])
    assert result.exit_code == 0, result.output
    assert "warning: agents.rebooker runs agent 'flight-rebooker' (Rebooker.name)" in result.output


def test_the_default_data_dir_is_per_user_and_per_swarm_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from busagents.cli.swarm import default_data_dir

    monkeypatch.setenv("BUSAGENTS_DATA_DIR", str(tmp_path / "user"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, other = default_data_dir(tmp_path / "a" / "swarm.toml"), default_data_dir(tmp_path / "b" / "swarm.toml")
    assert one.parent == other.parent == tmp_path / "user" / "swarms"
    assert one.name.startswith("swarm-") and one != other
    assert default_data_dir(tmp_path / "a" / "swarm.toml") == one


def plain(screen: bytes) -> str:
    """What a terminal shows, roughly: the text without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))


async def test_swarm_up_in_a_terminal_shows_a_live_table_of_its_agents(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\n')
    terminal, stdout = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "swarm", "up", str(swarm), "--nats", nats_server.url),
        *("--data-dir", str(tmp_path / "data")),
        env=child_env(),
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(stdout)
    loop = asyncio.get_running_loop()
    screen = bytearray()
    shown = asyncio.Event()
    row = re.compile(r"│ slow +│ +1/1 │ +0 │ +1 │ +0 │ +0 │")  # one replica of one running, no restart, one handled

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the last process holding the terminal exited
                return
            if not chunk:
                return
            screen.extend(chunk)
            if row.search(plain(bytes(screen))):
                loop.call_soon_threadsafe(shown.set)

    reader = asyncio.create_task(asyncio.to_thread(read))
    try:
        async with reaped(proc):
            await bus.wait_for_agents(["slow"], timeout=30)
            async with bus.expect(Done, where=lambda d: d.n == 71, timeout=10):
                await bus.publish(Job(n=71))
            await asyncio.wait_for(shown.wait(), 20)  # the next heartbeats reach the table
            _, err = await sigterm(proc)
    finally:
        await asyncio.wait_for(reader, 10)
        os.close(terminal)
    assert proc.returncode == 0, err.decode()
    text = plain(bytes(screen))
    assert "┃ agent ┃ replicas ┃ restarts ┃ handled ┃ in flight ┃ dead letters ┃ last beat ┃" in text
    assert "started slow[0] pid" in text, err.decode()  # the events, and what a replica prints, above the table
    assert f"slow[0]: running slow on {nats_server.url}" in text
