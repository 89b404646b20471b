"""LLM settings from the environment, per agent; the SDK's own variables are honoured."""

from __future__ import annotations

import pytest

from busagents.llm import LLMSettings, has_api_key, make_client
from busagents.llm.testing import MessagesServer, text


def test_settings_come_from_busagents_llm_variables_and_can_be_overridden_per_agent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BUSAGENTS_LLM_MODEL", "claude-haiku-4-5")
    monkeypatch.setenv("BUSAGENTS_LLM_MAX_TOKENS", "512")
    monkeypatch.setenv("BUSAGENTS_LLM_REASONER_MODEL", "claude-opus-4-8")
    monkeypatch.setenv("BUSAGENTS_LLM_REASONER_APPROVAL_THRESHOLD", "750")
    monkeypatch.setenv("BUSAGENTS_LLM_REASONER_FALLBACK", "review")

    reasoner = LLMSettings.for_agent("reasoner")
    other = LLMSettings.for_agent("summariser", temperature=0.2)

    assert (reasoner.model, reasoner.max_tokens, reasoner.approval_threshold) == ("claude-opus-4-8", 512, 750.0)
    assert reasoner.fallback == "review"
    assert (other.model, other.max_tokens, other.temperature) == ("claude-haiku-4-5", 512, 0.2)
    assert other.approval_threshold is None and other.fallback == "offline"  # off and offline by default


def test_invalid_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSAGENTS_LLM_REASONER_FALLBACK", "pray")
    with pytest.raises(ValueError, match="fallback"):
        LLMSettings.for_agent("reasoner")


def test_cost_prices_input_output_and_cache_tokens() -> None:
    s = LLMSettings(price_input_per_mtok=3.0, price_output_per_mtok=15.0)
    assert s.cost(1_000_000, 0) == pytest.approx(3.0)
    assert s.cost(0, 1_000_000) == pytest.approx(15.0)
    assert s.cost(0, 0, cache_write=1_000_000, cache_read=1_000_000) == pytest.approx(3.75 + 0.3)


async def test_the_client_honours_anthropic_api_key_and_base_url(
    monkeypatch: pytest.MonkeyPatch, messages_server: MessagesServer
) -> None:
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.url)
    assert has_api_key()
    messages_server.script(text("hello"))
    client = make_client(LLMSettings(max_retries=0, timeout=5))
    reply = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.content[0].type == "text"
    (request,) = messages_server.requests
    assert "sk-from-the-environment" in (
        request.headers.get("x-api-key", "") + request.headers.get("Authorization", "")
    )


def test_without_a_key_there_is_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    assert not has_api_key()
