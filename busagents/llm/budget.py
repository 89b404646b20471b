"""Token and cost budgets per conversation and per rolling hour.

Spending is recorded after each model call; before each call the agent asks
:meth:`Budget.spent` whether a limit is reached, and degrades to its fallback if so.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

__all__ = ["Budget"]

_HOUR = 3600.0


class Budget:
    """Limits of one agent replica; None means unlimited."""

    def __init__(
        self,
        *,
        conversation_max_tokens: int | None = None,
        conversation_max_cost: float | None = None,
        hourly_max_tokens: int | None = None,
        hourly_max_cost: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_conversations: int = 10_000,
    ) -> None:
        self.conversation_max_tokens = conversation_max_tokens
        self.conversation_max_cost = conversation_max_cost
        self.hourly_max_tokens = hourly_max_tokens
        self.hourly_max_cost = hourly_max_cost
        self._clock = clock
        self._max_conversations = max_conversations
        self._conversations: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._window: deque[tuple[float, int, float]] = deque()
        self._hour_tokens = 0
        self._hour_cost = 0.0

    def record(self, conversation_id: str, tokens: int, cost: float) -> None:
        """Count one model call's tokens and cost against the conversation and the hour."""
        spent_tokens, spent_cost = self._conversations.pop(conversation_id, (0, 0.0))
        self._conversations[conversation_id] = (spent_tokens + tokens, spent_cost + cost)
        while len(self._conversations) > self._max_conversations:
            self._conversations.popitem(last=False)
        self._window.append((self._clock(), tokens, cost))
        self._hour_tokens += tokens
        self._hour_cost += cost

    def conversation(self, conversation_id: str) -> tuple[int, float]:
        """Tokens and USD spent so far in one conversation."""
        return self._conversations.get(conversation_id, (0, 0.0))

    def hour(self) -> tuple[int, float]:
        """Tokens and USD spent in the last hour."""
        horizon = self._clock() - _HOUR
        window = self._window
        while window and window[0][0] <= horizon:
            _, tokens, cost = window.popleft()
            self._hour_tokens -= tokens
            self._hour_cost -= cost
        return self._hour_tokens, max(self._hour_cost, 0.0)

    def spent(self, conversation_id: str) -> str | None:
        """Why no further model call is allowed for this conversation, or None when one is."""
        tokens, cost = self.conversation(conversation_id)
        if self.conversation_max_tokens is not None and tokens >= self.conversation_max_tokens:
            return f"conversation token budget spent ({tokens} of {self.conversation_max_tokens} tokens)"
        if self.conversation_max_cost is not None and cost >= self.conversation_max_cost:
            return f"conversation cost budget spent (${cost:.4f} of ${self.conversation_max_cost:.4f})"
        tokens, cost = self.hour()
        if self.hourly_max_tokens is not None and tokens >= self.hourly_max_tokens:
            return f"hourly token budget spent ({tokens} of {self.hourly_max_tokens} tokens in the last hour)"
        if self.hourly_max_cost is not None and cost >= self.hourly_max_cost:
            return f"hourly cost budget spent (${cost:.4f} of ${self.hourly_max_cost:.4f} in the last hour)"
        return None
