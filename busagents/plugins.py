"""Agent plugins: the entry-point group ``busagents.agents`` (the one global registry)."""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .agent import Agent
from .contract import contract_info, is_contract
from .errors import ConfigError

__all__ = [
    "AGENTS_GROUP",
    "DEMOS_GROUP",
    "available_agents",
    "available_contracts",
    "find_contract",
    "load_agent",
    "qualified_name",
]

AGENTS_GROUP = "busagents.agents"
DEMOS_GROUP = "busagents.demos"


def available_agents() -> dict[str, EntryPoint]:
    """Installed agent plugins by name."""
    return {ep.name: ep for ep in entry_points(group=AGENTS_GROUP)}


def load_agent(name: str) -> type[Agent]:
    """An agent class by plugin name, or by import path ``package.module:Class``."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import agent {name!r}: {exc}") from None
    else:
        plugins = available_agents()
        if name not in plugins:
            known = ", ".join(sorted(plugins)) or "none installed"
            raise ConfigError(f"no agent plugin named {name!r} (installed: {known}); see 'busagents agents list'")
        try:
            obj = plugins[name].load()
        except Exception as exc:
            raise ConfigError(f"agent plugin {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Agent)):
        raise ConfigError(f"{name!r} is {obj!r}, not a busagents Agent subclass")
    return obj


def available_contracts() -> tuple[list[type[Any]], dict[str, str]]:
    """The contracts the installed agents declare (handled, produced, awaited, and the queries' replies).

    Returns them with the plugins that failed to load (name -> why), so a caller can say
    where a contract it did not find may be.
    """
    found: dict[type[Any], None] = {}
    failed: dict[str, str] = {}
    for name in sorted(available_agents()):
        try:
            cls = load_agent(name)
        except ConfigError as exc:
            failed[name] = str(exc)
            continue
        for contract in (*cls.consumes(), *cls.produces, *cls.awaits):
            found[contract] = None
            reply = contract_info(contract).reply
            if reply is not None:
                found[reply] = None
    return list(found), failed


def qualified_name(contract: type[Any]) -> str:
    """``package.module:Class``, the name that always finds one contract."""
    return f"{contract.__module__}:{contract.__qualname__}"


def find_contract(name: str) -> type[Any]:
    """A contract class by name: its contract name or class name (``RebookPassenger``), as declared
    by an installed agent plugin, or fully qualified (``busagents_travel.messages:RebookPassenger``,
    also with a dot before the class). An ambiguous short name is an error listing the candidates.
    """
    if ":" in name:
        return _import_contract(name, *name.split(":", 1))
    contracts, failed = available_contracts()
    matches = [c for c in contracts if name in (contract_info(c).name, c.__qualname__)]
    if not matches:
        matches = [c for c in contracts if name == f"{c.__module__}.{c.__qualname__}"]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(sorted(qualified_name(c) for c in matches))
        raise ConfigError(f"contract name {name!r} is ambiguous: {listed}; give one of these fully qualified names")
    if "." in name:  # module.Class of a contract no installed agent declares
        module_name, _, attr = name.rpartition(".")
        try:
            return _import_contract(name, module_name, attr)
        except ConfigError:
            pass
    known = ", ".join(sorted({contract_info(c).name for c in contracts})) or "none"
    broken = "".join(f"; plugin {plugin} failed to load: {why}" for plugin, why in failed.items())
    raise ConfigError(
        f"no contract named {name!r} among those the installed agents declare ({known}){broken}; "
        "name it as package.module:Class to use another one"
    )


def _import_contract(name: str, module_name: str, attr: str) -> type[Any]:
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import contract {name!r}: {exc}") from None
    if not (isinstance(obj, type) and is_contract(obj)):
        raise ConfigError(f"{name!r} is {obj!r}, not a contract (@event, @command or @query)")
    return obj
