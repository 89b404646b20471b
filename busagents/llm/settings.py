"""Settings of an LLM agent, from ``BUSAGENTS_LLM_*`` environment variables.

Every field can be set for all LLM agents (``BUSAGENTS_LLM_MODEL``) and overridden for one
agent by its name (``BUSAGENTS_LLM_REASONER_MODEL`` for the agent ``reasoner``)::

    settings = LLMSettings.for_agent("reasoner")

The API key and the endpoint are the SDK's own: ``ANTHROPIC_API_KEY`` (or
``ANTHROPIC_AUTH_TOKEN``) and ``ANTHROPIC_BASE_URL``, so a gateway or proxy works unchanged.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LLMSettings", "has_api_key"]

_PREFIX = "BUSAGENTS_LLM_"

#: List prices of the Claude models, USD per million tokens (input, output), from
#: https://docs.anthropic.com/en/docs/about-claude/pricing (cache writes 1.25x, reads 0.1x input).
_LIST_PRICES: dict[str, tuple[float, float]] = {
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4-0": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "claude-3-haiku": (0.25, 1.25),
}


class LLMSettings(BaseSettings):
    """How one LLM agent calls the model, what it may spend, and what it does when it cannot."""

    model_config = SettingsConfigDict(env_prefix=_PREFIX, extra="ignore")

    #: Model name sent to the Messages API.
    model: str = "claude-sonnet-4-6"
    #: Output tokens per model call.
    max_tokens: int = Field(default=1024, ge=1)
    #: Sampling temperature; None leaves it to the model (some models accept none).
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    #: Seconds one HTTP attempt may take before it is abandoned (and retried).
    timeout: float = Field(default=60.0, gt=0)
    #: Retries of one model call on 408/409/429/5xx/connection errors/timeouts (the SDK's backoff).
    max_retries: int = Field(default=2, ge=0)
    #: A ``retry-after`` longer than this is not waited for: the call fails over at once.
    max_retry_wait: float = Field(default=30.0, ge=0)
    #: After this many model calls failed in a row (retries included), stop calling the model for
    #: ``breaker_cooldown`` seconds: decisions fall back at once instead of each waiting out the
    #: retries. 0: never.
    breaker_failures: int = Field(default=3, ge=0)
    breaker_cooldown: float = Field(default=30.0, ge=0)
    #: Seconds one whole decision (every model call and tool query) may take.
    deadline: float = Field(default=180.0, gt=0)
    #: Model calls in flight at once, per agent replica, at the start: the limit then adapts to the
    #: API's answers (more while it accepts, halved on a 429) between 1 and ``concurrency_max``.
    concurrency: int = Field(default=4, ge=1)
    #: The most model calls in flight the adaptive limit may reach (None: ``concurrency``, fixed).
    concurrency_max: int | None = Field(default=32, ge=1)
    #: Tool calls (bus queries) the model may make for one decision before it must decide.
    max_tool_calls: int = Field(default=12, ge=0)
    #: Times an invalid decision is sent back to the model with the error before falling back.
    max_corrections: int = Field(default=2, ge=0)
    #: Seconds a bus query made for the model may take.
    query_timeout: float = Field(default=5.0, gt=0)

    #: Budgets per conversation (all decisions of one conversation id) and per rolling hour
    #: (this replica). None: unlimited. When one is spent the agent degrades to ``fallback``.
    conversation_max_tokens: int | None = Field(default=200_000, ge=0)
    conversation_max_cost: float | None = Field(default=2.0, ge=0)
    hourly_max_tokens: int | None = Field(default=2_000_000, ge=0)
    hourly_max_cost: float | None = Field(default=20.0, ge=0)

    #: Group decisions (many items of one case in one call): at most this many items, and at most
    #: about this many input tokens of items (estimated) and output tokens of answers per call.
    group_max_items: int = Field(default=64, ge=1)
    group_max_tokens: int = Field(default=12_000, ge=100)
    group_max_output_tokens: int = Field(default=8_192, ge=256)

    #: List prices in USD per million tokens (input, output) by model name or name prefix, the
    #: longest match wins; override with ``BUSAGENTS_LLM_PRICES='{"my-model": [1.0, 5.0]}'``.
    prices: dict[str, tuple[float, float]] = Field(default_factory=lambda: dict(_LIST_PRICES))
    #: Prices of a model the table does not name.
    price_input_per_mtok: float = Field(default=3.0, ge=0)
    price_output_per_mtok: float = Field(default=15.0, ge=0)
    cache_write_factor: float = Field(default=1.25, ge=0)
    cache_read_factor: float = Field(default=0.1, ge=0)

    #: What happens when the model cannot give a valid decision (budget, errors, corrections
    #: exhausted): the agent's offline policy decides, or the case goes to the human-review
    #: subject ``busagents.llm.review.<agent>``. Never dropped.
    fallback: Literal["offline", "review"] = "offline"
    #: Decisions costing more than this wait for a human approval message; None: off.
    approval_threshold: float | None = Field(default=None, ge=0)
    #: Seconds to wait for an approval before the case goes to human review.
    approval_timeout: float = Field(default=300.0, gt=0)

    @classmethod
    def for_agent(cls, agent: str, **overrides: Any) -> LLMSettings:
        """Settings of ``agent``: ``BUSAGENTS_LLM_*``, then ``BUSAGENTS_LLM_<AGENT>_*``, then ``overrides``."""
        base = cls()
        prefix = f"{_PREFIX}{re.sub(r'[^A-Za-z0-9]', '_', agent).upper()}_"
        values = base.model_dump()
        for name in cls.model_fields:
            raw = os.environ.get(prefix + name.upper())
            if raw is not None:
                values[name] = raw
        values.update(overrides)
        return cls.model_validate(values)

    def price(self, model: str | None = None) -> tuple[float, float]:
        """USD per million (input, output) tokens of ``model`` (default: ``self.model``)."""
        name = model or self.model
        matches = [key for key in self.prices if name.startswith(key)]
        if not matches:
            return self.price_input_per_mtok, self.price_output_per_mtok
        return self.prices[max(matches, key=len)]

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_write: int = 0,
        cache_read: int = 0,
        *,
        model: str | None = None,
    ) -> float:
        """The estimated price in USD of one call's usage, at the list price of ``model``."""
        price_in, price_out = self.price(model)
        per_input = price_in / 1_000_000
        return (
            input_tokens * per_input
            + cache_write * per_input * self.cache_write_factor
            + cache_read * per_input * self.cache_read_factor
            + output_tokens * price_out / 1_000_000
        )


def has_api_key() -> bool:
    """True when the SDK will find a static credential (``ANTHROPIC_API_KEY`` or ``ANTHROPIC_AUTH_TOKEN``)."""
    return bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN"))
