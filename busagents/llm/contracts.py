"""The framework's own LLM contracts: cases handed to humans, and approvals of costly decisions.

Humans (or a UI agent acting for them) subscribe ``busagents.llm.review.*`` and
``busagents.llm.approval.requested.*``, and answer an approval request by publishing
:class:`ApprovalDecided` with its ``request_id``. An agent that may send these declares
them in its ``produces`` like any other contract.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..contract import event

__all__ = ["ApprovalDecided", "ApprovalRequested", "ReviewRequested"]


@event("busagents.llm.review", key="agent")
class ReviewRequested(msgspec.Struct, kw_only=True):
    """A case the model could not decide validly, handed to a human instead of being dropped."""

    agent: str
    decision_contract: str
    reason: str
    task: str
    case: Any = None
    last_attempt: Any = None
    conversation_id: str = ""


@event("busagents.llm.approval.requested", key="agent")
class ApprovalRequested(msgspec.Struct, kw_only=True):
    """A decision above the approval threshold, held until a human approves or rejects it."""

    request_id: str
    agent: str
    decision_contract: str
    decision: Any
    cost: float
    threshold: float
    summary: str = ""
    conversation_id: str = ""
    expires_in: float = 0.0


@event("busagents.llm.approval.decided", key="request_id")
class ApprovalDecided(msgspec.Struct, kw_only=True):
    """A human's answer to an :class:`ApprovalRequested`."""

    request_id: str
    approved: bool
    by: str
    note: str = ""


def builtins(value: Any) -> Any:
    """A contract instance (or anything msgspec knows) as plain JSON-ready builtins."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return msgspec.to_builtins(value)
