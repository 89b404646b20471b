"""``swarm.toml``: which agents run, how many replicas, where NATS is.

::

    nats_url = "nats://127.0.0.1:4222"   # optional: unset starts an embedded nats-server

    [agents.monitor]
    replicas = 1

    [agents.reasoner]
    replicas = 2
    env = { BUSAGENTS_LLM_MODEL = "claude-sonnet-4-5" }

    [agents.worker]
    agent = "my_package.worker:Worker"   # an import path instead of the plugin name
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..agent import Agent
from ..errors import ConfigError
from .graph import GraphProblem

__all__ = ["AgentSpec", "SwarmConfig", "load_swarm"]


class AgentSpec(BaseModel):
    """One agent of the swarm."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = None  # plugin name or module:Class; default: the table's key
    replicas: int = Field(default=1, ge=1, le=64)
    env: dict[str, str] = Field(default_factory=dict)
    restart: bool = True


class SwarmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nats_url: str | None = None
    max_restarts: int = Field(default=5, ge=0)  # per replica, within restart_window seconds
    restart_window: float = Field(default=60.0, gt=0)
    agents: dict[str, AgentSpec]

    def targets(self) -> dict[str, str]:
        """Swarm key -> what `busagents run` is given."""
        return {key: spec.agent or key for key, spec in self.agents.items()}

    def check(self, agents: Mapping[str, type[Agent]]) -> list[GraphProblem]:
        """Errors in running these ``agents`` (swarm key -> class) as configured; ``swarm up`` refuses each.

        A ``singleton`` agent must run as one instance: one entry with ``replicas = 1``.
        """
        targets = self.targets()
        entries: dict[type[Agent], list[str]] = {}
        for key, cls in agents.items():
            if cls.singleton:
                entries.setdefault(cls, []).append(key)
        problems = []
        for cls, keys in entries.items():
            why = "declares singleton = True (it must run as one instance)"
            if len(keys) == 1:
                key = keys[0]
                replicas = self.agents[key].replicas
                if replicas > 1:
                    who = key if targets[key] == key else f"{key} ({targets[key]})"
                    message = f"{who} {why} but the swarm gives it replicas = {replicas}; set replicas = 1"
                    problems.append(GraphProblem("error", message))
            else:
                total = sum(self.agents[key].replicas for key in keys)
                message = (
                    f"agents {keys} all run {cls.__qualname__}, which {why}, as {total} instances; "
                    "keep one of them, with replicas = 1"
                )
                problems.append(GraphProblem("error", message))
        return problems


def load_swarm(path: str | Path) -> SwarmConfig:
    """Read and validate a swarm file; errors name the file and the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"swarm file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        config = SwarmConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    if not config.agents:
        raise ConfigError(f"{path}: no [agents.NAME] tables; a swarm needs at least one agent")
    return config
