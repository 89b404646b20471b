"""``busagents contracts lock`` and ``check``: the lock is current, breaks fail, running agents are checked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

from busagents_travel import FlightDelayed, PassengerNotified
from click.testing import CliRunner, Result

from busagents import Agent, Bus, Context, NatsUnavailableError, on
from busagents.registry import LOCK_FILE, check_against, installed_contracts, lock_text, read_lock, schemas_of
from busagents.server import NatsServer
from busagents.testing import run_agents

ROOT = Path(__file__).resolve().parent.parent

#: An agent declaring FlightDelayed version 1 with another field than the installed contract's.
ROGUE = """
import msgspec
from busagents import Agent, Context, event, on

@event("travel.flight.delayed", name="FlightDelayed", version=1, key="flight_id", durable=True)
class FlightDelayed(msgspec.Struct):
    flight_id: str
    delay_hours: float

class Rogue(Agent):
    name = "rogue-monitor"

    @on(FlightDelayed)
    async def seen(self, msg: FlightDelayed, ctx: Context) -> None:
        pass
"""


def cli(*args: str) -> Result:
    from busagents.cli import cli as command

    return CliRunner().invoke(command, list(args))


def test_the_committed_lock_file_is_current() -> None:
    installed = schemas_of(installed_contracts())
    committed = (ROOT / LOCK_FILE).read_text(encoding="utf-8")
    if committed != lock_text(installed):
        changed = [line for f in check_against(read_lock(ROOT / LOCK_FILE), installed) for line in f.lines()]
        listed = "\n".join(changed) or "(descriptions or layout only)"
        raise AssertionError(
            f"contracts changed since {LOCK_FILE}; run 'busagents contracts lock' in {ROOT}:\n{listed}"
        )


def _edit(lock: Path, contract: str, edit: Any) -> None:
    document = json.loads(lock.read_text())
    schema = document["contracts"][contract]["1"]
    edit(schema["$defs"][contract])
    lock.write_text(json.dumps(document))


def test_check_fails_on_a_breaking_change_under_the_same_version_and_passes_compatible_ones(tmp_path: Path) -> None:
    lock = tmp_path / "lock.json"
    written = cli("contracts", "lock", "-o", str(lock))
    assert written.exit_code == 0, written.output
    assert cli("contracts", "lock", "-o", str(lock)).output.startswith(f"unchanged {lock}")
    clean = cli("contracts", "check", "--lock", str(lock))
    assert clean.exit_code == 0, clean.output
    assert "no breaking change" in clean.output
    pristine = lock.read_text()

    # as if FlightDelayed v1 had gained long_delay (with a default) since the lock: compatible
    _edit(lock, "FlightDelayed", lambda defs: defs["properties"].pop("long_delay"))
    compatible = cli("contracts", "check", "--lock", str(lock))
    assert compatible.exit_code == 0, compatible.output
    assert "compatible FlightDelayed v1: long_delay: new optional field" in compatible.output.splitlines()

    # ... and had lost the field gate: breaking
    def with_gate(defs: dict[str, Any]) -> None:
        defs["properties"]["gate"] = {"type": "string"}
        defs["required"].append("gate")

    lock.write_text(pristine)
    _edit(lock, "FlightDelayed", with_gate)
    broken = cli("contracts", "check", "--lock", str(lock))
    assert broken.exit_code == 1, broken.output
    assert "BREAKING   FlightDelayed v1: gate: removed field" in broken.output.splitlines()
    assert "1 breaking change(s)" in broken.output


class Listener(Agent):
    """Runs with the installed FlightDelayed: its schema matches."""

    name = "lock-listener"
    produces = (PassengerNotified,)

    @on(FlightDelayed)
    async def seen(self, msg: FlightDelayed, ctx: Context) -> None:
        pass


async def _registered(bus: Bus, agent: str, timeout: float = 60.0) -> None:
    """Wait until ``agent`` wrote its schemas to the registry."""
    from busagents.registry import _bucket

    kv = await _bucket(bus, create=True)
    assert kv is not None
    watcher = await kv.watch(f"{agent}.>")
    try:
        async with asyncio.timeout(timeout):
            async for entry in watcher:
                if entry is not None and entry.value:
                    return
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]


async def test_check_live_catches_a_running_agent_with_a_mismatching_schema(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    (tmp_path / "rogue_agent.py").write_text(textwrap.dedent(ROGUE))
    lock = tmp_path / "lock.json"
    assert (await asyncio.to_thread(cli, "contracts", "lock", "-o", str(lock))).exit_code == 0
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rogue = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "busagents", "run", "rogue_agent:Rogue", "--nats", nats_server.url), env=env
    )
    try:
        async with run_agents(bus, Listener()):
            await asyncio.gather(_registered(bus, "lock-listener"), _registered(bus, "rogue-monitor"))
            live = await asyncio.to_thread(
                cli, "contracts", "check", "--lock", str(lock), "--live", "--nats", nats_server.url
            )
    finally:
        rogue.send_signal(signal.SIGTERM)
        await asyncio.wait_for(rogue.wait(), 30)
    assert live.exit_code == 1, live.output
    broken = [line for line in live.output.splitlines() if line.startswith("BREAKING")]
    assert broken, live.output
    assert all("FlightDelayed v1" in line and "running agent rogue-monitor" in line for line in broken), broken
    assert any("delay_minutes: removed field" in line for line in broken), broken
    assert any("delay_hours: new required field" in line for line in broken), broken
    assert "lock-listener" not in live.output  # the same schema as installed: nothing to say


def test_check_live_without_jetstream_says_so(tmp_path: Path) -> None:
    lock = tmp_path / "lock.json"
    assert cli("contracts", "lock", "-o", str(lock)).exit_code == 0
    with NatsServer(jetstream=False) as server:
        result = cli("contracts", "check", "--lock", str(lock), "--live", "--nats", server.url)
    assert result.exit_code == 1
    assert isinstance(result.exception, NatsUnavailableError)
    assert "cannot read the busagents-contracts bucket" in str(result.exception)
    assert "no JetStream there" in str(result.exception)
