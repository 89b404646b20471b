"""``busagents contracts lock`` and ``busagents contracts check``: contract versions, kept compatible."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
from nats.micro.service import ServiceVerb

from ..bus import Bus
from ..compatibility import compare_schemas
from ..micro import discover
from ..registry import (
    LOCK_FILE,
    ContractKey,
    Finding,
    RunningSchema,
    check_against,
    installed_contracts,
    lock_text,
    read_lock,
    running_schemas,
    schemas_of,
)
from ._nats import nats_option, nats_url

_lock_path = click.Path(dir_okay=False, path_type=Path)


@click.group("contracts")
def contracts_group() -> None:
    """Contract versions: lock the installed contracts' schemas, check changes against the lock."""


@contracts_group.command("lock")
@click.option("-o", "--output", type=_lock_path, default=LOCK_FILE, show_default=True, help="The lock file to write.")
def lock_command(output: Path) -> None:
    """Write the JSON Schema of every installed contract (and query reply), by name and version, to a lock file.

    Commit the file: 'busagents contracts check' compares the installed contracts with it.
    """
    schemas = schemas_of(installed_contracts())
    text = lock_text(schemas)
    unchanged = output.exists() and output.read_text(encoding="utf-8") == text
    if not unchanged:
        output.write_text(text, encoding="utf-8")
    names = len({name for name, _ in schemas})
    click.echo(f"{'unchanged' if unchanged else 'wrote'} {output}: {len(schemas)} versions of {names} contracts")


@contracts_group.command("check")
@click.option("--lock", "lock", type=_lock_path, default=LOCK_FILE, show_default=True, help="The lock file.")
@click.option("--live", is_flag=True, help="Also check the schemas the running agents published.")
@nats_option
def check_command(lock: Path, live: bool, nats: str | None) -> None:
    """Compare the installed contracts with the lock file (and, with --live, with the running agents').

    Prints one line per change: BREAKING (a removed, retyped or new required field, a field made
    required, a narrowed enum, a changed subject under the same version) or compatible (a new
    field with a default, a widened enum...). Exits with 1 when a change is breaking, else 0.
    A new contract or version is no break: lock it.
    """
    locked = read_lock(lock)
    installed = schemas_of(installed_contracts())
    findings = check_against(locked, installed)
    if live:
        with nats_url(nats) as url:
            findings += asyncio.run(_live(url, {**locked, **installed}))
    for finding in findings:
        for line in finding.lines():
            click.echo(line)
    breaking = sum(len(f.breaking) for f in findings)
    where = f"{lock}" + (" and the running agents" if live else "")
    if breaking:
        click.echo(f"{breaking} breaking change(s) against {where}: give the contract a new version", err=True)
        sys.exit(1)
    compatible = sum(len(f.changes) for f in findings)
    click.echo(f"no breaking change against {where} ({len(installed)} contract versions, {compatible} compatible)")


async def _live(url: str, reference: dict[ContractKey, dict[str, Any]]) -> list[Finding]:
    """A finding per running agent instance whose schema differs from the installed (else the locked) one."""
    bus = await Bus.connect(url, name="busagents-cli")
    try:
        entries = await running_schemas(bus)
        alive = {answer.get("id") for answer in await discover(bus.nc, ServiceVerb.PING)}
    finally:
        await bus.close()
    findings = []
    stale = [e for e in entries if e.instance not in alive]
    for entry in entries:
        if entry.instance not in alive:
            continue
        key = (entry.contract, entry.version)
        where = _where(entry)
        if key not in reference:
            findings.append(Finding(*key, status="unknown", where=where))
            continue
        changes = compare_schemas(reference[key], entry.schema)
        if changes:
            findings.append(Finding(*key, tuple(changes), where=where))
    if stale:
        instances = len({e.instance for e in stale})
        click.echo(f"skipped {len(stale)} schema(s) of {instances} instance(s) that no longer answer", err=True)
    return findings


def _where(entry: RunningSchema) -> str:
    return f"running agent {entry.agent} instance {entry.instance} on {entry.host} pid {entry.pid}"
