"""The codec: bytes to contracts, every bad input a DecodeError that says what was wrong."""

from __future__ import annotations

import msgspec
import pydantic
import pytest

from busagents import event
from busagents.codec import codec_for
from busagents.errors import DecodeError


@event("test.codec.struct")
class Reading(msgspec.Struct):
    sensor: str
    value: int


@event("test.codec.model")
class Note(pydantic.BaseModel):
    text: str


def nested(depth: int) -> bytes:
    """A valid contract body with an unknown field holding arrays nested ``depth`` deep."""
    return b'{"sensor": "s1", "value": 1, "text": "t", "extra": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("contract", [Reading, Note], ids=["msgspec", "pydantic"])
def test_json_nested_too_deeply_is_a_decode_error(contract: type) -> None:
    with pytest.raises(DecodeError, match=r"malformed JSON|Invalid JSON"):
        codec_for(contract).decode(nested(1_001))


def test_nesting_within_the_limit_still_decodes() -> None:
    assert codec_for(Reading).decode(nested(100)) == Reading(sensor="s1", value=1)
