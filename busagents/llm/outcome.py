"""What one decision cost and how it was reached: the result object of :class:`Decider`.

Every model call is recorded (model, tokens, cache tokens, cost, latency, HTTP attempts)
and every tool call (tool, contract, latency, error), so telemetry can export them as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from .client import Attempt

__all__ = ["ModelCall", "Outcome", "Source", "ToolCall", "Usage"]

D = TypeVar("D")

#: Who made the decision: the model, the offline policy, or nobody yet (handed to a human).
Source = Literal["model", "offline", "review"]


@dataclass(slots=True)
class ModelCall:
    """One Messages API call, retries included."""

    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    stop_reason: str | None = None
    request_id: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: str = ""

    @property
    def tokens(self) -> int:
        """Every token billed: input, cache writes and reads, output."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens + self.output_tokens


@dataclass(slots=True)
class ToolCall:
    """One tool the model called: a bus query, the decision, or something it may not call."""

    tool: str
    contract: str | None
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(slots=True)
class Outcome(Generic[D]):
    """A validated decision (or the hand-over to a human) and the record of how it was reached."""

    decision: D | None = None
    source: Source = "model"
    #: Why the model's decision was not used (budget, errors, invalid output...); None when it was.
    reason: str | None = None
    calls: list[ModelCall] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    #: Invalid decisions sent back to the model with their error.
    corrections: int = 0
    #: Tool names the model asked for that the agent does not declare (never executed).
    refused_tools: list[str] = field(default_factory=list)
    #: The typed replies of the queries the model made, in order.
    replies: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def model(self) -> str | None:
        return self.calls[-1].model if self.calls else None

    @property
    def input_tokens(self) -> int:
        return sum(c.input_tokens for c in self.calls)

    @property
    def output_tokens(self) -> int:
        return sum(c.output_tokens for c in self.calls)

    @property
    def cache_creation_input_tokens(self) -> int:
        return sum(c.cache_creation_input_tokens for c in self.calls)

    @property
    def cache_read_input_tokens(self) -> int:
        return sum(c.cache_read_input_tokens for c in self.calls)

    @property
    def cost(self) -> float:
        return sum(c.cost for c in self.calls)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)


@dataclass(slots=True)
class Usage:
    """Model requests and tokens summed over decisions (a disruption's, a day's), and their estimated cost."""

    requests: int = 0  # model calls made (each may take several HTTP attempts)
    attempts: int = 0  # HTTP attempts, retries after 429/5xx included
    throttled: int = 0  # attempts answered 429
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    def add(self, outcome: Outcome[Any]) -> None:
        """Count the model calls of one decision."""
        for call in outcome.calls:
            self.requests += 1
            self.attempts += len(call.attempts)
            self.throttled += sum(1 for a in call.attempts if a.status == 429)
            self.input_tokens += call.input_tokens
            self.cache_creation_input_tokens += call.cache_creation_input_tokens
            self.cache_read_input_tokens += call.cache_read_input_tokens
            self.output_tokens += call.output_tokens
            self.cost += call.cost

    def merge(self, other: Usage) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def report(self) -> dict[str, float]:
        """The figures as the demo's report names them (``llm.requests``, ``llm.estimated_cost_usd``...)."""
        return {
            "requests": self.requests,
            "attempts": self.attempts,
            "throttled": self.throttled,
            "input_tokens": self.input_tokens,
            "cache_creation_tokens": self.cache_creation_input_tokens,
            "cache_read_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
            "estimated_cost_usd": round(self.cost, 4),
        }
