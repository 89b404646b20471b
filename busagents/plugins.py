"""Agent plugins: the entry-point group ``busagents.agents`` (the one global registry)."""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from .agent import Agent
from .errors import ConfigError

__all__ = ["AGENTS_GROUP", "DEMOS_GROUP", "available_agents", "load_agent"]

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
