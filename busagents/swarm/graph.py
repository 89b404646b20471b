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

import msgspec

from ..agent import Agent
from ..contract import ContractInfo, Kind, contract_info
from ..dlq import dlq_permissions
from ..durable import jetstream_permissions, stream_name
from ..envelope import CAUSATION_ID, CONTRACT, CONVERSATION_ID, MSG_ID, SENDER, SENT_AT, TRACEPARENT, VERSION
from ..micro import service_subjects
from ..state import state_permissions
from ..subjects import inbox_prefix, stats_subject
from ..view import view_permissions

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
        for agent in self.agents:
            for contract in agent.consumes():
                self.consumers.setdefault(contract, []).append(agent.name)
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
            if info.kind is Kind.COMMAND and len(consumers) > 1:
                problems.append(
                    GraphProblem("error", f"command {info.name} is consumed by several agent types: {consumers}")
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
        (:data:`~busagents.durable.DLQ_STREAM`) and requests answered on the agent's own inbox
        (:func:`inbox_prefix`; ``busagents run`` connects with it), and the NATS services protocol
        (:mod:`busagents.micro`). Every agent answers requests (``$SRV.PING`` at least), so it
        gets ``allow_responses`` (one reply to each request it received) instead of a publish
        right on other connections' inboxes. The dicts are nats-server ``permissions`` blocks.
        """
        out: dict[str, dict[str, Any]] = {}
        for agent in self.agents:
            pub = {stats_subject(agent.name)} | dlq_permissions(agent.name)
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

    def asyncapi(self, title: str = "busagents swarm", version: str = "1.0.0") -> dict[str, Any]:
        """An AsyncAPI 3.0 document of every contract and every agent's operations."""
        headers = _headers_schema()
        channels: dict[str, Any] = {}
        messages: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for info in self.contracts:
            carried = _messages(info, headers, schemas)
            messages.update(carried)
            channels[info.name] = _channel(info, carried)
        operations: dict[str, Any] = {}
        for agent in self.agents:
            operations.update(_operations(agent))
        return {
            "asyncapi": "3.0.0",
            "info": {"title": title, "version": version},
            "defaultContentType": "application/json",
            "channels": channels,
            "operations": operations,
            "components": {"messages": messages, "schemas": schemas},
        }


def _headers_schema() -> dict[str, Any]:
    """The envelope headers every message carries."""
    return {
        "type": "object",
        "properties": {
            MSG_ID: {"type": "string", "description": "message id (JetStream de-duplication)"},
            CONTRACT: {"type": "string"},
            VERSION: {"type": "string", "description": "integer contract version"},
            CONVERSATION_ID: {"type": "string"},
            CAUSATION_ID: {"type": "string"},
            SENDER: {"type": "string"},
            SENT_AT: {"type": "string", "description": "ns since the Unix epoch"},
            TRACEPARENT: {"type": "string", "description": "W3C trace context"},
        },
    }


def _messages(info: ContractInfo, headers: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """The messages on a contract's channel: the contract's own, then its reply's if it is a query."""
    messages: dict[str, Any] = {
        info.name: {
            "name": info.name,
            "title": info.name,
            "summary": info.description or info.name,
            "contentType": "application/json",
            "headers": headers,
            "payload": _component_schema(info, schemas),
        }
    }
    if info.reply is not None:
        reply = contract_info(info.reply)
        messages[reply.name] = {
            "name": reply.name,
            "contentType": "application/json",
            "payload": _component_schema(reply, schemas),
        }
    return messages


def _channel(info: ContractInfo, messages: dict[str, Any]) -> dict[str, Any]:
    """A contract's channel: its subject (with the key as a parameter) and the messages it carries."""
    channel: dict[str, Any] = {
        "address": f"{info.subject}.{{{info.key}}}" if info.key else info.subject,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
        "x-busagents": {"kind": info.kind.value, "version": info.version, "durable": info.durable},
    }
    if info.key:
        channel["parameters"] = {info.key: {"description": f"the message's {info.key} field"}}
    return channel


def _operations(agent: type[Agent]) -> dict[str, Any]:
    """An agent's operations: it receives what it consumes (replying to queries) and sends what it produces."""
    operations: dict[str, Any] = {}
    for contract in agent.consumes():
        info = contract_info(contract)
        receive: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{info.name}"},
            "summary": f"{agent.name} handles {info.name} ({info.kind.value})",
            "bindings": {"nats": {"queue": agent.name}},
        }
        if info.reply is not None:
            receive["reply"] = {"channel": {"$ref": f"#/channels/{info.name}"}}
        operations[f"{agent.name}.receive.{info.name}"] = receive
    for contract in agent.produces:
        info = contract_info(contract)
        operations[f"{agent.name}.send.{info.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{info.name}"},
            "summary": f"{agent.name} sends {info.name} ({info.kind.value})",
        }
    return operations


def _component_schema(info: ContractInfo, schemas: dict[str, Any]) -> dict[str, Any]:
    """The payload schema with its definitions hoisted into ``components.schemas``."""
    template = "#/components/schemas/{name}"
    if info.is_struct:
        (ref,), components = msgspec.json.schema_components([info.cls], ref_template=template)
        schemas.update(components)
        return dict(ref)
    schema = info.cls.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[info.cls.__name__] = schema
    return {"$ref": template.format(name=info.cls.__name__)}


def _waits_for(agent: type[Agent]) -> tuple[str, ...]:
    """Agent types ``agent`` waits for before it starts (an optional ``waits_for`` declaration)."""
    names = getattr(agent, "waits_for", ())
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, (tuple, list)) else ()


def _add(pub: set[str], sub: set[str], more: tuple[set[str], set[str]]) -> None:
    pub |= more[0]
    sub |= more[1]
