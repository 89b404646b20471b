"""Costly decisions wait for a human: above a threshold, a decision is held until approved.

Off by default. With ``BUSAGENTS_LLM_FLIGHT_REASONER_APPROVAL_THRESHOLD=500`` (or
``BUSAGENTS_LLM_APPROVAL_THRESHOLD``), every decision costing the airline more than 500
in the fare's currency (refund, waived change fees and fare difference) is published as
``ApprovalRequested`` and held until an ``ApprovalDecided`` answers it, so the rebooker
never acts on it unapproved. A rejected or unanswered one becomes ``keep`` ("an agent
will follow up") and goes to human review: the passengers still hear from the airline.
"""

from __future__ import annotations

import asyncio

import msgspec
from busagents_travel import Cost, RebookPassenger

from busagents import Context
from busagents.llm import ApprovalGate, LLMSettings, ReviewRequested
from busagents.llm.contracts import builtins

__all__ = ["Approvals", "airline_cost"]


def airline_cost(decision: RebookPassenger) -> float:
    """What the decision costs the airline, in the fare's currency (not minor units)."""
    c = decision.cost
    waived = c.change_fee + c.fare_difference if c.waived else 0
    return (c.refund + waived) / 100


class Approvals:
    """Holds the costly decisions of one reasoner agent until a human approves them."""

    def __init__(self, settings: LLMSettings) -> None:
        self.gate = ApprovalGate(settings.approval_threshold, timeout=settings.approval_timeout)
        self.approved = 0
        self.withheld = 0

    async def hold(self, decisions: list[RebookPassenger], ctx: Context) -> list[RebookPassenger]:
        """The decisions to publish: cheap ones as they are, costly ones once approved (else ``keep``)."""
        if self.gate.threshold is None:
            return decisions
        return list(await asyncio.gather(*(self._one(d, ctx) for d in decisions)))

    async def _one(self, decision: RebookPassenger, ctx: Context) -> RebookPassenger:
        cost = airline_cost(decision)
        if not self.gate.needed(cost):
            return decision
        money = f"{decision.cost.currency} {cost:,.2f}"
        answer = await self.gate.ask(ctx, decision, cost=cost, summary=f"{decision.action} for {money}")
        if answer is not None and answer.approved:
            self.approved += 1
            return decision
        self.withheld += 1
        why = (
            "no approval in time"
            if answer is None
            else f"rejected by {answer.by}" + (f": {answer.note}" if answer.note else "")
        )
        await ctx.publish(
            ReviewRequested(
                agent=ctx.agent.name,
                decision_contract="RebookPassenger",
                reason=f"a {decision.action} costing {money} was not approved ({why})",
                task="re-decide this booking by hand",
                case=builtins(decision),
                conversation_id=ctx.conversation_id or "",
            )
        )
        return msgspec.structs.replace(
            decision,
            action="keep",
            replaces=[],
            new_legs=[],
            cost=Cost(currency=decision.cost.currency),
            hotel=False,
            rationale=f"{decision.disruption.number}: your options need an agent's approval; an agent will follow up",
        )
