"""The static graph of a swarm: who consumes and produces which contract.

Because every agent declares what it consumes and what it may produce, a swarm can
be checked before it runs (a consumer without a producer waits forever; a query
without an answering agent fails every time), drawn (Mermaid), and exported as an
AsyncAPI 3 document from which an agent in another language can join.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..agent import Agent
from ..contract import ContractInfo, Kind, contract_info
from ..dlq import dlq_permissions
from ..durable import jetstream_permissions, stream_name
from ..micro import service_subjects
from ..registry import registry_permissions
from ..state import state_permissions
from ..subjects import inbox_prefix, stats_subject
from ..view import view_permissions
from .asyncapi import asyncapi_document

__all__ = ["Graph", "GraphProblem", "inbox_prefix"]


@dataclass(frozen=True, slots=True)
class GraphProblem:
    severity: str  # "error" | "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


class Graph:
    """Agents and the contracts between them."""

    def __init__(self, agents: Sequence[type[Agent]]) -> None:
        self.agents = list(agents)
        self.consumers: dict[type[Any], list[str]] = {}
        self.producers: dict[type[Any], list[str]] = {}
        #: contract -> the agents that only read it into a view (``@on(C, view=True)``)
        self.viewers: dict[type[Any], list[str]] = {}
        for agent in self.agents:
            for contract in agent.consumes():
                self.consumers.setdefault(contract, []).append(agent.name)
                if agent.handlers[contract].view:
                    self.viewers.setdefault(contract, []).append(agent.name)
            for contract in agent.produces:
                self.producers.setdefault(contract, []).append(agent.name)

    @property
    def contracts(self) -> list[ContractInfo]:
        seen = {**dict.fromkeys(self.consumers), **dict.fromkeys(self.producers)}
        return sorted((contract_info(c) for c in seen), key=lambda i: i.subject)

    def check(self, external: Iterable[str] = ()) -> list[GraphProblem]:
        """Problems of the graph. ``external`` names contracts fed from outside the swarm."""
        outside = set(external)
        problems: list[GraphProblem] = []
        for contract, consumers in self.consumers.items():
            info = contract_info(contract)
            if info.name in outside:
                continue
            if info.kind is Kind.QUERY:
                if len(consumers) > 1:
                    problems.append(
                        GraphProblem("warning", f"query {info.name} is answered by several agents: {consumers}")
                    )
                continue
            if contract not in self.producers:
                problems.append(
                    GraphProblem("warning", f"{info.name} is consumed by {consumers} but no agent produces it")
                )
            handling = [name for name in consumers if name not in self.viewers.get(contract, ())]
            if info.kind is Kind.COMMAND and len(handling) > 1:  # a view reads the stream: it handles nothing
                problems.append(
                    GraphProblem("error", f"command {info.name} is consumed by several agent types: {handling}")
                )
        for contract, producers in self.producers.items():
            info = contract_info(contract)
            if info.kind is Kind.QUERY and contract not in self.consumers and info.name not in outside:
                problems.append(GraphProblem("error", f"query {info.name} is sent by {producers} but nobody answers"))
            elif info.kind is Kind.COMMAND and contract not in self.consumers and info.name not in outside:
                problems.append(
                    GraphProblem("error", f"command {info.name} is sent by {producers} but nobody handles it")
                )
        by_subject: dict[str, list[str]] = {}
        for info in self.contracts:
            by_subject.setdefault(info.subject, []).append(info.name)
        for subject, names in sorted(by_subject.items()):
            if len(names) > 1:  # each consumer would get the others' messages and dead-letter them
                problems.append(GraphProblem("error", f"contracts {sorted(names)} share the subject {subject}"))
        return problems

    def mermaid(self) -> str:
        """A Mermaid flowchart: agents as boxes, contracts on the arrows."""

        def node(name: str) -> str:
            return f'{re.sub(r"[^A-Za-z0-9_]", "_", name)}["{name}"]'

        lines = ["flowchart LR"]
        for contract, producers in sorted(self.producers.items(), key=lambda kv: contract_info(kv[0]).name):
            name = contract_info(contract).name
            for producer in producers:
                consumers = self.consumers.get(contract)
                targets = [node(c) for c in consumers] if consumers else ["outside((outside))"]
                for target in targets:
                    lines.append(f"    {node(producer)} -->|{name}| {target}")
        return "\n".join(lines)

    def permissions(self) -> dict[str, dict[str, Any]]:
        """Least-privilege NATS permissions per agent: publish/subscribe allow lists, ``allow_responses``.

        Derived from each agent's declarations (handlers, ``produces``, durability,
        ``awaits``, ``state_buckets``, ``waits_for``) plus what every worker does: heartbeats, dead letters
        (:data:`~busagents.durable.DLQ_STREAM`), its schemas in the contracts registry
        (:mod:`busagents.registry`) and requests answered on the agent's own inbox
        (:func:`inbox_prefix`; ``busagents run`` connects with it), and the NATS services protocol
        (:mod:`busagents.micro`). Every agent answers requests (``$SRV.PING`` at least), so it
        gets ``allow_responses`` (one reply to each request it received) instead of a publish
        right on other connections' inboxes. The dicts are nats-server ``permissions`` blocks.
        """
        out: dict[str, dict[str, Any]] = {}
        for agent in self.agents:
            pub = {stats_subject(agent.name)} | dlq_permissions(agent.name) | registry_permissions(agent.name)
            # JetStream API replies (the dead-letter stream at start), publish acks, query replies,
            # pulled messages and watched keys all come to the agent's inbox
            sub = {f"{inbox_prefix(agent.name)}.>"}
            for handler in agent.handlers.values():
                info = handler.contract
                if handler.view and handler.durability is not None:  # an ordered consumer per replica
                    pub |= view_permissions(stream_name(info, handler.durability))
                    _add(pub, sub, jetstream_permissions(info, handler.durability, consumer=None))
                elif handler.durability is not None:  # a pull consumer, no core subscription
                    _add(pub, sub, jetstream_permissions(info, handler.durability, consumer=agent.name))
                else:
                    sub.add(handler.subject or info.subscribe_subject)
            for bucket in agent.state_buckets:
                _add(pub, sub, state_permissions(bucket))
            for contract in agent.produces:
                info = contract_info(contract)
                pub.add(info.subscribe_subject)
                if info.durability is not None:
                    _add(pub, sub, jetstream_permissions(info, info.durability, consumer=None))
            for contract in agent.awaits:  # a handler waits for it itself, and confirms it
                sub.add(contract_info(contract).subscribe_subject)
            for name in _waits_for(agent):  # Bus.wait_for_agents: their heartbeats
                sub.add(stats_subject(name))
            sub.update(service_subjects(agent.name))  # $SRV.PING/INFO/STATS: busagents ps, nats micro ls
            # allow_responses: one reply to each request received (queries, awaited answers, $SRV)
            out[agent.name] = {"publish": sorted(pub), "subscribe": sorted(sub), "allow_responses": True}
        return out

    def asyncapi(
        self, title: str = "busagents swarm", version: str = "1.0.0", nats_url: str | None = None
    ) -> dict[str, Any]:
        """An AsyncAPI 3.0 document of every contract, every agent's operations and the dead letters.

        ``servers`` names ``nats_url`` (default: nats://127.0.0.1:4222); see :mod:`busagents.swarm.asyncapi`.
        """
        return asyncapi_document(self, title=title, version=version, nats_url=nats_url)


def _waits_for(agent: type[Agent]) -> tuple[str, ...]:
    """Agent types ``agent`` waits for before it starts (an optional ``waits_for`` declaration)."""
    names = getattr(agent, "waits_for", ())
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, (tuple, list)) else ()


def _add(pub: set[str], sub: set[str], more: tuple[set[str], set[str]]) -> None:
    pub |= more[0]
    sub |= more[1]
