"""Choosing the reasoner backend."""

from __future__ import annotations

import pytest
from busagents_flight.policy import OfflinePolicy
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.reasoning import available_reasoners, load_reasoner

from busagents import ConfigError


def test_offline_reasoner_is_registered_and_the_default() -> None:
    assert "offline" in available_reasoners()
    assert isinstance(load_reasoner("offline"), OfflinePolicy)
    assert isinstance(ReasonerAgent().reasoner, OfflinePolicy)


def test_unknown_reasoner_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"no reasoner named .oracle.*offline"):
        load_reasoner("oracle")
