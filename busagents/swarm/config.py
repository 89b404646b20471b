"""``swarm.toml``: which agents run, how many replicas, where NATS is.

::

    [swarm]                              # optional: the swarm-level keys (also accepted at the top)
    nats_url = "nats://127.0.0.1:4222"   # optional: unset starts an embedded nats-server
    max_restarts = 5

    [agents.monitor]
    replicas = 1

    [agents.reasoner]
    replicas = 2
    env = { BUSAGENTS_LLM_MODEL = "claude-sonnet-4-5" }

    [agents.worker]
    agent = "my_package.worker:Worker"   # an import path instead of the plugin name

Every key, with its type, default and meaning: README, "Swarm file reference" (a test keeps the two in
step). A key in the wrong place is an error that says where it belongs.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..agent import Agent
from ..errors import ConfigError
from ..shadow import SHADOW_SUFFIX
from .graph import GraphProblem

__all__ = ["AgentSpec", "Autoscale", "SwarmConfig", "load_swarm"]


class Autoscale(BaseModel):
    """``autoscale = { min = 1, max = 4, lag = 1000 }``: replicas follow the lag of the agent's durable
    consumers (messages pending + unacknowledged), between ``min`` and ``max``, with hysteresis."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(default=1, ge=1, le=64)
    max: int = Field(ge=1, le=64)
    lag: int = Field(gt=0)  # a replica is added while the lag stays above this
    interval: float = Field(default=2.0, gt=0)  # seconds between two looks at the lag
    up_after: int = Field(default=2, ge=1)  # looks in a row above `lag` before a replica is added
    down_after: int = Field(default=5, ge=1)  # looks in a row below `lag` / 2 before one drains and stops

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.max < self.min:
            raise ValueError(f"autoscale: max ({self.max}) is below min ({self.min})")
        return self


class AgentSpec(BaseModel):
    """One agent of the swarm."""

    model_config = ConfigDict(extra="forbid")

    agent: str | None = None  # plugin name or module:Class; default: the table's key
    replicas: int = Field(default=1, ge=1, le=64)
    env: dict[str, str] = Field(default_factory=dict)
    restart: bool = True
    #: Run it as ``<name>-shadow`` in dry-run mode beside the live one (``busagents run --shadow``).
    shadow: bool = False
    #: Replicas that follow its durable consumers' lag (it starts with ``min``); unset: ``replicas``.
    autoscale: Autoscale | None = None
    #: CPU scheduling of its replicas: ``batch`` (Linux ``SCHED_BATCH``), ``normal``, or ``auto``: batch
    #: unless the agent is ``interactive`` (see ``BUSAGENTS_SCHEDULING``).
    scheduling: Literal["auto", "batch", "normal"] = "auto"

    @model_validator(mode="after")
    def _replicas_or_autoscale(self) -> AgentSpec:
        if self.autoscale is not None and "replicas" in self.model_fields_set:
            raise ValueError("set replicas or autoscale, not both (autoscale starts with its min)")
        return self

    @property
    def initial_replicas(self) -> int:
        """Replicas started with the swarm."""
        return self.autoscale.min if self.autoscale is not None else self.replicas

    @property
    def most_replicas(self) -> int:
        """The most replicas it may have at once."""
        return self.autoscale.max if self.autoscale is not None else self.replicas


class SwarmConfig(BaseModel):
    """The whole file: the swarm-level keys (in ``[swarm]`` or at the top) and ``[agents.NAME]`` tables."""

    model_config = ConfigDict(extra="forbid")

    nats_url: str | None = None
    max_restarts: int = Field(default=5, ge=0)  # per replica, within restart_window seconds
    restart_window: float = Field(default=60.0, gt=0)
    #: CPU scheduling of the embedded nats-server ``swarm up`` starts when no server is given.
    server_scheduling: Literal["batch", "normal"] = "batch"
    agents: dict[str, AgentSpec]

    @model_validator(mode="before")
    @classmethod
    def _swarm_table(cls, data: Any) -> Any:
        """``[swarm]`` holds the swarm-level keys; the same key also at the top is an error."""
        if not isinstance(data, dict) or "swarm" not in data:
            return data
        table = data["swarm"]
        if not isinstance(table, dict):
            raise ValueError("swarm must be a table: [swarm] with the swarm-level keys under it")
        rest = {k: v for k, v in data.items() if k != "swarm"}
        twice = sorted(set(table) & set(rest))
        if twice:
            raise ValueError(f"{', '.join(twice)} set both in [swarm] and at the top of the file; keep one")
        return {**rest, **table}

    def targets(self) -> dict[str, str]:
        """Swarm key -> what `busagents run` is given."""
        return {key: spec.agent or key for key, spec in self.agents.items()}

    def check(self, agents: Mapping[str, type[Agent]]) -> list[GraphProblem]:
        """Problems in running these ``agents`` (swarm key -> class) as configured.

        Errors (``swarm up`` refuses them, even with ``--force``): a ``singleton`` agent must run
        as one instance, one entry with ``replicas = 1``. Warnings: a swarm key that is not the
        agent's name (permissions, the graph, queue groups and stats go by the name).
        """
        return self._singletons(agents) + self._names(agents) + self._autoscaled(agents)

    def _autoscaled(self, agents: Mapping[str, type[Agent]]) -> list[GraphProblem]:
        """Autoscaling follows the lag of durable consumers: an agent without one cannot be scaled."""
        return [
            GraphProblem(
                "error",
                f"agents.{key} has autoscale, but {cls.__qualname__} has no durable handler: its replicas "
                "follow the lag of its durable consumers; give it replicas instead",
            )
            for key, cls in agents.items()
            if self.agents[key].autoscale is not None and not any(h.durable for h in cls.handlers.values())
        ]

    def _names(self, agents: Mapping[str, type[Agent]]) -> list[GraphProblem]:
        problems = []
        for key, cls in agents.items():
            name = cls.name + SHADOW_SUFFIX if self.agents[key].shadow else cls.name  # a shadow runs as <name>-shadow
            if name != key:
                problems.append(
                    GraphProblem(
                        "warning",
                        f"agents.{key} runs agent {name!r} ({cls.__qualname__}.name"
                        f"{' + shadow' if name != cls.name else ''}): its permissions, graph "
                        f"entries, queue group, dead letters and stats go by {name!r}, not {key!r}; "
                        f"name the table [agents.{name}] to match",
                    )
                )
        return problems

    def _singletons(self, agents: Mapping[str, type[Agent]]) -> list[GraphProblem]:
        targets = self.targets()
        entries: dict[type[Agent], list[str]] = {}
        for key, cls in agents.items():
            if cls.singleton and not self.agents[key].shadow:  # a shadow sends nothing: not a second instance
                entries.setdefault(cls, []).append(key)
        problems = []
        for cls, keys in entries.items():
            why = "declares singleton = True (it must run as one instance)"
            if len(keys) == 1:
                key = keys[0]
                replicas = self.agents[key].most_replicas
                if replicas > 1:
                    who = key if targets[key] == key else f"{key} ({targets[key]})"
                    what = "autoscale.max" if self.agents[key].autoscale else "replicas"
                    message = f"{who} {why} but the swarm gives it {what} = {replicas}; set replicas = 1"
                    problems.append(GraphProblem("error", message))
            else:
                total = sum(self.agents[key].most_replicas for key in keys)
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
        problems = "; ".join(_explain(e["loc"], e["type"], e["msg"], e.get("input")) for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    if not config.agents:
        raise ConfigError(f"{path}: no [agents.NAME] tables; a swarm needs at least one agent")
    return config


SWARM_KEYS = tuple(k for k in SwarmConfig.model_fields if k != "agents")
AGENT_KEYS = tuple(AgentSpec.model_fields)


def _explain(loc: tuple[int | str, ...], kind: str, message: str, value: Any) -> str:
    """One validation error as a user can act on it: a misplaced key says where it belongs."""
    where = ".".join(str(p) for p in loc)
    key = str(loc[-1]) if loc else ""
    if kind == "extra_forbidden" and len(loc) == 3 and loc[0] == "agents":
        if key in SWARM_KEYS:
            return (
                f"{where}: {key} is a swarm-level key ([swarm]), not an agent key; "
                f"move it from [agents.{loc[1]}] to the [swarm] table"
            )
        return (
            f"{where}: unknown agent key {key!r}{_close(key, AGENT_KEYS)}; an agent's keys are {', '.join(AGENT_KEYS)}"
        )
    if kind == "extra_forbidden" and len(loc) == 1:
        if key == "agent" and isinstance(value, dict):
            return f"{where}: agents are [agents.NAME] tables (agents, plural), not [agent.NAME]"
        if key in AGENT_KEYS:
            return (
                f"{where}: {key} is an agent key ([agents.NAME]), not a swarm-level key; "
                "set it in the [agents.NAME] table of each agent it is for"
            )
        known = (*SWARM_KEYS, "agents")
        return f"{where}: unknown swarm key {key!r}{_close(key, known)}; the swarm's keys are {', '.join(SWARM_KEYS)}"
    if kind == "missing" and loc == ("agents",):
        return "no [agents.NAME] tables; a swarm needs at least one agent"
    if not loc:
        return message.removeprefix("Value error, ")
    return f"{where}: {message}"


def _close(key: str, known: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
