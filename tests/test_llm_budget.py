"""Token and cost budgets per conversation and per rolling hour."""

from __future__ import annotations

from busagents.llm import Budget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_conversation_budget_is_per_conversation() -> None:
    budget = Budget(conversation_max_tokens=1000, conversation_max_cost=1.0)
    budget.record("c1", 600, 0.1)
    assert budget.spent("c1") is None
    budget.record("c1", 400, 0.1)
    assert budget.spent("c1") == "conversation token budget spent (1000 of 1000 tokens)"
    assert budget.spent("c2") is None
    budget.record("c2", 10, 1.5)
    assert budget.spent("c2") == "conversation cost budget spent ($1.5000 of $1.0000)"


def test_hourly_budget_rolls_over_after_an_hour() -> None:
    clock = Clock()
    budget = Budget(hourly_max_tokens=1000, hourly_max_cost=5.0, clock=clock)
    budget.record("a", 700, 1.0)
    clock.now += 1800
    budget.record("b", 300, 1.0)
    assert budget.spent("c") == "hourly token budget spent (1000 of 1000 tokens in the last hour)"
    clock.now += 1801  # the first call is now more than an hour old
    assert budget.spent("c") is None
    assert budget.hour() == (300, 1.0)


def test_unlimited_budget_never_cuts() -> None:
    budget = Budget()
    budget.record("c", 10**9, 10**6)
    assert budget.spent("c") is None


def test_forgotten_conversations_are_bounded() -> None:
    budget = Budget(max_conversations=2)
    for c in ("a", "b", "c"):
        budget.record(c, 1, 0.0)
    assert budget.conversation("a") == (0, 0.0) and budget.conversation("c") == (1, 0.0)
