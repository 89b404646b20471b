"""LLM reasoning agents on the ``anthropic`` SDK: bus queries as tools, validated typed decisions.

:class:`Decider` runs the tool-use loop for one agent; :class:`LLMSettings` configures it
from ``BUSAGENTS_LLM_*``; :class:`ApprovalGate` holds costly decisions for a human;
``busagents.llm.testing`` is a local Messages API for tests.
"""

from .approval import ApprovalGate
from .budget import Budget
from .client import Attempt, ModelUnavailableError, RetryAfterTooLongError, make_client
from .contracts import ApprovalDecided, ApprovalRequested, ReviewRequested
from .decider import Check, Decider, Fallback
from .outcome import ModelCall, Outcome, Source, ToolCall
from .settings import LLMSettings, has_api_key
from .tools import DecisionTool, QueryTool, input_schema, tool_name

__all__ = [
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
    "has_api_key",
    "input_schema",
    "make_client",
    "tool_name",
]
