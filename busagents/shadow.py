"""Shadow agents: a second version of an agent on live traffic, judged beside the live one.

``busagents run NAME --shadow`` (or ``shadow = true`` in swarm.toml) runs the agent as
``NAME-shadow``: its own queue group and durable consumers, so it sees every message the live
agent sees without taking any away, in dry-run mode (:mod:`busagents.dryrun`), so what it
decides is recorded, never sent. :func:`compare` puts its records beside the live agent's
messages caused by the same input (``Ba-Causation-Id``): which cases agree, the decisions
that differ side by side, the latency from the input to each side's outputs, and the model
tokens (``Ba-Llm``) each spent.

What counts as one decision is the contract's to say: a contract class may define
``shadow_decisions(self) -> dict[str, object]`` (e.g. per booking: action, flights, cabin);
otherwise each output is one decision, keyed by its contract and subject.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import msgspec

from .agent import Agent
from .conversation import scan_streams
from .dryrun import read_records
from .envelope import MSG_ID, SENDER
from .observe import Catalog, Seen

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["SHADOW_SUFFIX", "Case", "ShadowReport", "compare", "shadow_of"]

SHADOW_SUFFIX = "-shadow"
A = TypeVar("A", bound=Agent)
_TOKENS = re.compile(r"\btokens=(\d+)")


def shadow_of(cls: type[A]) -> type[A]:
    """The agent class ``cls`` running as ``<name>-shadow`` (its own queue group and consumers)."""
    shadow = type(f"{cls.__name__}Shadow", (cls,), {"name": cls.name + SHADOW_SUFFIX, "__module__": cls.__module__})
    return cast("type[A]", shadow)


@dataclass(slots=True)
class Side:
    """What one side (live or shadow) sent for one input."""

    decisions: dict[str, Any] = field(default_factory=dict)
    latency: float | None = None  # seconds from the input's sending to the side's last output
    tokens: int = 0


@dataclass(slots=True)
class Case:
    """One input message both sides handled, and whether they decided the same."""

    input_id: str
    input_contract: str | None
    live: Side
    shadow: Side

    @property
    def agrees(self) -> bool:
        return self.live.decisions == self.shadow.decisions

    def differences(self) -> list[dict[str, Any]]:
        keys = sorted(set(self.live.decisions) | set(self.shadow.decisions))
        return [
            {"decision": k, "live": self.live.decisions.get(k), "shadow": self.shadow.decisions.get(k)}
            for k in keys
            if self.live.decisions.get(k) != self.shadow.decisions.get(k)
        ]


@dataclass(slots=True)
class ShadowReport:
    """A shadow agent's cases beside the live agent's."""

    agent: str
    cases: list[Case]

    @property
    def agreement(self) -> float:
        """The share of decisions both sides made alike (1.0 when there is nothing to compare)."""
        decisions = sum(len(set(c.live.decisions) | set(c.shadow.decisions)) for c in self.cases)
        differing = sum(len(c.differences()) for c in self.cases)
        return (decisions - differing) / decisions if decisions else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "shadow": self.agent + SHADOW_SUFFIX,
            "agreement": round(self.agreement, 4),
            "decisions": sum(len(set(c.live.decisions) | set(c.shadow.decisions)) for c in self.cases),
            "differing_decisions": sum(len(c.differences()) for c in self.cases),
            "cases": len(self.cases),
            "agreeing_cases": sum(c.agrees for c in self.cases),
            "live": _side_summary([c.live for c in self.cases]),
            "shadow_side": _side_summary([c.shadow for c in self.cases]),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "differing": [
                {"input": c.input_id, "contract": c.input_contract, "differences": c.differences()}
                for c in self.cases
                if not c.agrees
            ],
        }


def _side_summary(sides: list[Side]) -> dict[str, Any]:
    latencies = [s.latency for s in sides if s.latency is not None]
    return {
        "median_latency_seconds": round(statistics.median(latencies), 6) if latencies else None,
        "max_latency_seconds": round(max(latencies), 6) if latencies else None,
        "tokens": sum(s.tokens for s in sides),
    }


async def compare(bus: Bus, catalog: Catalog, agent: str | None = None) -> list[ShadowReport]:
    """A report for each shadow agent that recorded something (only ``agent``'s shadow, if given)."""
    records = [r.seen for r in await read_records(bus, catalog)]
    shadows: dict[str, list[Seen]] = defaultdict(list)
    for seen in records:
        if seen.sender and seen.sender.endswith(SHADOW_SUFFIX):
            shadows[seen.sender.removesuffix(SHADOW_SUFFIX)].append(seen)
    if agent is not None:
        shadows = {agent: shadows.get(agent, [])}
    if not shadows:
        return []
    causes = {s.causation for found in shadows.values() for s in found if s.causation}
    live_names = set(shadows)

    def wanted(headers: dict[str, str]) -> bool:
        return headers.get(SENDER) in live_names or headers.get(MSG_ID) in causes

    kept = await scan_streams(bus, catalog, wanted)
    inputs = {s.id: s for s in kept if s.id is not None and s.id in causes and s.dead_letter is None}
    reports = []
    for name, shadow_out in sorted(shadows.items()):
        live_out = [s for s in kept if s.sender == name and s.dead_letter is None]
        reports.append(ShadowReport(name, _cases(catalog, inputs, live_out, shadow_out)))
    return reports


def _cases(catalog: Catalog, inputs: dict[str, Seen], live: list[Seen], shadow: list[Seen]) -> list[Case]:
    by_cause: dict[str, tuple[list[Seen], list[Seen]]] = defaultdict(lambda: ([], []))
    for seen in live:
        if seen.causation:
            by_cause[seen.causation][0].append(seen)
    for seen in shadow:
        if seen.causation:
            by_cause[seen.causation][1].append(seen)
    cases = []
    for cause, (live_out, shadow_out) in sorted(by_cause.items()):
        if not shadow_out:
            continue  # the shadow did not see it (it started later): nothing to compare
        source = inputs.get(cause)
        sent = source.time if source is not None else None
        cases.append(
            Case(
                cause,
                source.contract if source is not None else None,
                _side(catalog, live_out, sent),
                _side(catalog, shadow_out, sent),
            )
        )
    return cases


def _side(catalog: Catalog, outputs: list[Seen], sent: float | None) -> Side:
    side = Side()
    for seen in outputs:
        side.decisions.update(decisions(catalog, seen))
        if seen.llm:
            found = _TOKENS.search(seen.llm)
            side.tokens += int(found.group(1)) if found else 0
    times = [s.time for s in outputs if s.time is not None]
    if sent is not None and times:
        side.latency = max(times) - sent
    return side


def decisions(catalog: Catalog, seen: Seen) -> dict[str, Any]:
    """What one output decided, by decision: the contract's ``shadow_decisions()``, else the whole body."""
    info = catalog.by_name.get(seen.contract or "")
    method = getattr(info.cls, "shadow_decisions", None) if info is not None else None
    if info is not None and method is not None and seen.known:
        message = msgspec.convert(seen.body, info.cls) if info.is_struct else info.cls.model_validate(seen.body)
        return {str(k): msgspec.to_builtins(v) for k, v in message.shadow_decisions().items()}
    return {f"{seen.contract} {seen.subject}": seen.body}
