"""Human approval of costly decisions: ask on a subject, hold the decision until answered.

::

    gate = ApprovalGate(settings.approval_threshold, timeout=settings.approval_timeout)
    if gate.needed(cost):
        answer = await gate.ask(ctx, decision, cost=cost, summary="rebook 4 passengers in business")
        if answer is None or not answer.approved:
            ...  # not applied: hand the case to a human

The agent declares ``produces = (..., ApprovalRequested)`` and ``awaits = (ApprovalDecided,)``.
The request is published as :class:`ApprovalRequested` on
``busagents.llm.approval.requested.<agent>``; the answer is the first
:class:`ApprovalDecided` on ``busagents.llm.approval.decided.<request_id>``. The
agent's handler waits for it, so nothing downstream acts before a human said yes.
An answer sent as a request (as ``busagents llm approve|reject`` does) gets an empty
reply once the gate took it; an answer nobody waits for gets no responder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from ..codec import codec_for
from ..context import Context
from ..contract import contract_info, subject_for
from ..envelope import new_id
from ..errors import DecodeError, UndeclaredContractError
from .contracts import ApprovalDecided, ApprovalRequested, builtins

__all__ = ["ApprovalGate"]

log = logging.getLogger("busagents.llm.approval")


class ApprovalGate:
    """Decides which decisions need a human's approval and waits for it."""

    def __init__(self, threshold: float | None, *, timeout: float = 300.0) -> None:
        self.threshold = threshold
        self.timeout = timeout

    def needed(self, cost: float) -> bool:
        """True when ``cost`` is above the threshold (never when the threshold is off)."""
        return self.threshold is not None and cost > self.threshold

    async def ask(self, ctx: Context, decision: Any, *, cost: float, summary: str = "") -> ApprovalDecided | None:
        """Publish the approval request and wait for the answer; None when nobody answered in time.

        The agent must declare :class:`ApprovalRequested` in its ``produces`` and
        :class:`ApprovalDecided` in its ``awaits`` (its permissions derive from them).
        """
        if ApprovalDecided not in ctx.agent.awaits:
            raise UndeclaredContractError(
                f"agent {ctx.agent.name!r} may not wait for ApprovalDecided: "
                f"add it to {type(ctx.agent).__name__}.awaits"
            )
        request_id = new_id()
        decide_info = contract_info(ApprovalDecided)
        subject = subject_for(decide_info, ApprovalDecided(request_id=request_id, approved=False, by=""))
        answered: asyncio.Future[ApprovalDecided] = asyncio.get_running_loop().create_future()
        decode = codec_for(ApprovalDecided).decode

        async def on_answer(msg: Msg) -> None:
            try:
                answer = decode(msg.data)
            except DecodeError as exc:
                log.warning("ignoring an invalid approval answer on %s: %s", msg.subject, exc)
                return
            if answer.request_id == request_id and not answered.done():
                answered.set_result(answer)
                if msg.reply:  # `busagents llm approve|reject` waits for this confirmation
                    with contextlib.suppress(nats.errors.Error):
                        await ctx.bus.nc.publish(msg.reply, b"")

        sub = await ctx.bus.nc.subscribe(subject, cb=on_answer)
        try:
            await ctx.publish(
                ApprovalRequested(
                    request_id=request_id,
                    agent=ctx.agent.name,
                    decision_contract=type(decision).__name__,
                    decision=builtins(decision),
                    cost=cost,
                    threshold=self.threshold or 0.0,
                    summary=summary,
                    conversation_id=ctx.conversation_id or "",
                    expires_in=self.timeout,
                )
            )
            try:
                return await asyncio.wait_for(answered, self.timeout)
            except TimeoutError:
                log.warning("approval %s of %s: no answer within %.0fs", request_id, ctx.agent.name, self.timeout)
                return None
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
