"""LLM reasoning agents on the ``anthropic`` SDK: bus queries as tools, validated typed decisions.

:class:`Decider` runs the tool-use loop for one agent; :class:`LLMSettings` configures it
from ``BUSAGENTS_LLM_*``; :class:`ApprovalGate` holds costly decisions for a human;
``busagents.llm.testing`` is a local Messages API for tests.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .approval import ApprovalGate
    from .budget import Budget
    from .client import Attempt, ModelUnavailableError, RetryAfterTooLongError, make_client
    from .concurrency import AdaptiveLimit
    from .contracts import ApprovalDecided, ApprovalRequested, ReviewRequested
    from .decider import Check, Decider, Fallback
    from .outcome import ModelCall, Outcome, Source, ToolCall, Usage
    from .settings import LLMSettings, has_api_key
    from .tools import DecisionTool, QueryTool, input_schema, tool_name

# Imported on first use: ``anthropic`` alone costs ~45 MB and ~1 s to import, and a process
# that only needs the approval contracts (``busagents llm watch``, any agent run by the CLI)
# must not pay for it.
_WHERE: dict[str, str] = {
    "ApprovalDecided": "contracts",
    "ApprovalGate": "approval",
    "ApprovalRequested": "contracts",
    "Attempt": "client",
    "Budget": "budget",
    "Check": "decider",
    "Decider": "decider",
    "DecisionTool": "tools",
    "Fallback": "decider",
    "LLMSettings": "settings",
    "ModelCall": "outcome",
    "ModelUnavailableError": "client",
    "Outcome": "outcome",
    "QueryTool": "tools",
    "RetryAfterTooLongError": "client",
    "ReviewRequested": "contracts",
    "Source": "outcome",
    "ToolCall": "outcome",
    "Usage": "outcome",
    "AdaptiveLimit": "concurrency",
    "has_api_key": "settings",
    "input_schema": "tools",
    "make_client": "client",
    "tool_name": "tools",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AdaptiveLimit",
    "ApprovalDecided",
    "ApprovalGate",
    "ApprovalRequested",
    "Attempt",
    "Budget",
    "Check",
    "Decider",
    "DecisionTool",
    "Fallback",
    "LLMSettings",
    "ModelCall",
    "ModelUnavailableError",
    "Outcome",
    "QueryTool",
    "RetryAfterTooLongError",
    "ReviewRequested",
    "Source",
    "ToolCall",
    "Usage",
    "has_api_key",
    "input_schema",
    "make_client",
    "tool_name",
]
