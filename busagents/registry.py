"""The contracts registry: every contract's JSON Schema by name and version, in a lock file and at run time.

- The lock file (``busagents contracts lock``) holds the schemas of the installed contracts;
  ``busagents contracts check`` compares the installed ones with it (:func:`check_against`).
- At run time each worker writes the schemas of the contracts its agents consume and produce
  to the key-value bucket :data:`BUCKET`, one key per agent instance and contract version
  (``<agent>.<instance>.<contract>.<version>``); ``contracts check --live`` reads them back
  (:func:`running_schemas`) and compares each with the installed (or locked) schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import nats.errors
import nats.js.api
import nats.js.errors

from .compatibility import Change, compare_schemas
from .contract import contract_info, is_contract, json_schema, upcasters
from .errors import ConfigError, NatsUnavailableError
from .state import bucket_keys

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from .agent import Agent
    from .bus import Bus

__all__ = [
    "BUCKET",
    "LOCK_FILE",
    "ContractKey",
    "Finding",
    "RunningSchema",
    "check_against",
    "installed_contracts",
    "lock_text",
    "publish_schemas",
    "read_lock",
    "registry_permissions",
    "running_schemas",
    "schemas_of",
    "withdraw_schemas",
]

log = logging.getLogger("busagents.registry")

#: The key-value bucket running agents write their contracts' schemas to.
BUCKET = "busagents-contracts"
#: The lock file's default name, at the project root.
LOCK_FILE = "contracts.lock.json"
_FORMAT = 1
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-=]")

#: (contract name, version)
ContractKey = tuple[str, int]
Schema = dict[str, Any]


# The installed contracts and the lock file


def installed_contracts() -> list[type[Any]]:
    """The contracts of the installed agent plugins, and every other contract (an earlier version,
    one no agent uses yet) declared in the modules that declare them."""
    from .plugins import available_contracts  # plugins import agents; keep this module light

    found, failed = available_contracts()
    for plugin, why in failed.items():
        log.warning("agent plugin %s failed to load; its contracts are not checked: %s", plugin, why)
    contracts: dict[type[Any], None] = dict.fromkeys(found)
    for module_name in sorted({c.__module__ for c in found}):
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, type) and is_contract(value) and value.__module__ == module_name:
                contracts[value] = None
    for contract in list(contracts):  # the earlier versions a contract has upcasters from
        for source, _ in upcasters(contract).values():
            contracts[source] = None
    return list(contracts)


def schemas_of(contracts: Iterable[type[Any]]) -> dict[ContractKey, Schema]:
    """The JSON Schema of each contract by (name, version); two different schemas under one are an error."""
    schemas: dict[ContractKey, Schema] = {}
    classes: dict[ContractKey, type[Any]] = {}
    for contract in contracts:
        info = contract_info(contract)
        key = (info.name, info.version)
        schema = json_schema(contract)
        if key in schemas and schemas[key] != schema:
            raise ConfigError(
                f"{info.name} version {info.version} is declared twice with different schemas: "
                f"{_qualified(classes[key])} and {_qualified(contract)}; give one a new version"
            )
        schemas[key], classes[key] = schema, contract
    return schemas


def lock_text(schemas: dict[ContractKey, Schema]) -> str:
    """The lock file's text: sorted, indented, one trailing newline (diffs read well, reruns change nothing)."""
    contracts: dict[str, dict[str, Schema]] = {}
    for (name, version), schema in sorted(schemas.items()):
        contracts.setdefault(name, {})[str(version)] = schema
    document = {"busagents-contracts-lock": _FORMAT, "contracts": contracts}
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def read_lock(path: Path) -> dict[ContractKey, Schema]:
    """The schemas of a lock file by (name, version)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no lock file {path}: write it with 'busagents contracts lock'") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the lock file {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("busagents-contracts-lock") != _FORMAT:
        raise ConfigError(f"{path} is not a busagents contracts lock file (format {_FORMAT})")
    schemas: dict[ContractKey, Schema] = {}
    for name, versions in document.get("contracts", {}).items():
        for version, schema in versions.items():
            schemas[(name, int(version))] = schema
    return schemas


@dataclass(frozen=True, slots=True)
class Finding:
    """What ``contracts check`` says about one contract version: its changes, or that it is new or gone."""

    contract: str
    version: int
    changes: tuple[Change, ...] = ()
    status: str = "changed"  # changed | new | gone | unknown (a running agent's, neither installed nor locked)
    where: str = ""  # e.g. "running agent flight-monitor (instance ...)"

    @property
    def breaking(self) -> list[Change]:
        return [c for c in self.changes if c.breaking]

    def lines(self) -> list[str]:
        """One line per change, breaking ones first: ``BREAKING   FlightDelayed v1: delay: retyped field (...)``."""
        head = f"{self.contract} v{self.version}"
        suffix = f" [{self.where}]" if self.where else ""
        if self.status == "new":
            return [f"{'new':<10} {head}: not in the lock yet ('busagents contracts lock' adds it){suffix}"]
        if self.status == "gone":
            return [f"{'gone':<10} {head}: in the lock, no longer installed{suffix}"]
        if self.status == "unknown":
            return [f"{'unknown':<10} {head}: neither installed here nor locked{suffix}"]
        return [f"{'BREAKING' if c.breaking else 'compatible':<10} {head}: {c}{suffix}" for c in self.changes]


def check_against(reference: dict[ContractKey, Schema], current: dict[ContractKey, Schema]) -> list[Finding]:
    """Compare ``current`` schemas with ``reference`` (the lock file), contract by contract and version."""
    findings = []
    for key in sorted(reference.keys() | current.keys()):
        if key not in current:
            findings.append(Finding(*key, status="gone"))
        elif key not in reference:
            findings.append(Finding(*key, status="new"))
        else:
            changes = compare_schemas(reference[key], current[key])
            if changes:
                findings.append(Finding(*key, tuple(changes)))
    return findings


def _qualified(cls: type[Any]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# At run time


class RunningSchema(msgspec.Struct, frozen=True):
    """What one agent instance wrote to :data:`BUCKET` for one contract version it uses."""

    agent: str
    instance: str
    contract: str
    version: int
    roles: list[str]  # consumes, produces, awaits, upcasts (an earlier version it converts)
    schema: Schema
    host: str = ""
    pid: int = 0
    time: float = 0.0


def _uses(agent: type[Agent]) -> dict[type[Any], list[str]]:
    """The contracts an agent uses, each with its roles."""
    roles: dict[type[Any], list[str]] = {}
    for contract in agent.consumes():
        roles.setdefault(contract, []).append("consumes")
        for source, _ in upcasters(contract).values():
            roles.setdefault(source, []).append("upcasts")
    for role, contracts in (("produces", agent.produces), ("awaits", agent.awaits)):
        for contract in contracts:
            roles.setdefault(contract, []).append(role)
    return roles


def _key(agent: str, instance: str, contract: str, version: int) -> str:
    return f"{agent}.{instance}.{_KEY_UNSAFE.sub('_', contract)}.{version}"


async def _bucket(bus: Bus, *, create: bool) -> KeyValue | None:
    try:
        return await bus.js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    config = nats.js.api.KeyValueConfig(
        bucket=BUCKET, history=1, storage=nats.js.api.StorageType.FILE, replicas=bus.replicas or 1
    )
    return await bus.js.create_key_value(config)


async def publish_schemas(bus: Bus, agents: Iterable[tuple[Agent, str]]) -> list[str]:
    """Write the schemas each agent (with its instance id) uses to :data:`BUCKET`; returns the keys written.

    Without JetStream (or when the server refuses) it logs once and returns what it wrote:
    an agent runs without the registry.
    """
    written: list[str] = []
    try:
        kv = await _bucket(bus, create=True)
        assert kv is not None
        puts = []
        for agent, instance in agents:
            for contract, roles in _uses(type(agent)).items():
                info = contract_info(contract)
                entry = RunningSchema(
                    agent=agent.name,
                    instance=instance,
                    contract=info.name,
                    version=info.version,
                    roles=roles,
                    schema=json_schema(contract),
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    time=time.time(),
                )
                key = _key(agent.name, instance, info.name, info.version)
                puts.append(kv.put(key, msgspec.json.encode(entry)))
                written.append(key)
        await asyncio.gather(*puts)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        log.info("contract schemas not written to the %s bucket (no JetStream here?): %r", BUCKET, exc)
        return []
    return written


async def withdraw_schemas(bus: Bus, keys: list[str], timeout: float = 0.5) -> None:
    """Delete the keys an instance wrote (on drain); what is left behind is stale, and ``--live`` skips it."""
    if not keys:
        return
    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
        async with asyncio.timeout(timeout):
            kv = await _bucket(bus, create=False)
            if kv is not None:
                await asyncio.gather(*(kv.delete(key) for key in keys))


async def running_schemas(bus: Bus) -> list[RunningSchema]:
    """Every schema the agents wrote to :data:`BUCKET` (of instances running or not).

    Raises :class:`~busagents.errors.NatsUnavailableError` when the server has no JetStream to read it from.
    """
    try:
        kv = await _bucket(bus, create=False)
        if kv is None:
            return []
        keys = await bucket_keys(kv)
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
        raise NatsUnavailableError(
            f"cannot read the {BUCKET} bucket at {bus.url}: no JetStream there ({type(exc).__name__})"
        ) from None
    found = []
    for key in sorted(keys):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # withdrawn meanwhile
        if entry.value:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                found.append(msgspec.json.decode(entry.value, type=RunningSchema))
    return found


def registry_permissions(agent: str) -> set[str]:
    """NATS publish permissions a worker needs to write (and withdraw) its agent's schemas."""
    stream = f"KV_{BUCKET}"
    return {
        f"$KV.{BUCKET}.{agent}.>",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
    }
