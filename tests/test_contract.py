"""Contract declarations: kinds, subjects with keys, JSON Schema, clear errors."""

from __future__ import annotations

import msgspec
import pydantic
import pytest

from busagents import Agent, Context, ContractError, Kind, command, contract_info, event, json_schema, on, query
from busagents.contract import subject_for


@event("test.contract.delayed", key="flight_id", version=2)
class Delayed(msgspec.Struct):
    """A flight is late."""

    flight_id: str
    delay_minutes: int


class Count(msgspec.Struct):
    n: int


@query("test.contract.count", reply=Count)
class HowMany(pydantic.BaseModel):
    what: str


def test_declaration_is_recorded() -> None:
    info = contract_info(Delayed)
    assert (info.kind, info.name, info.version, info.key) == (Kind.EVENT, "Delayed", 2, "flight_id")
    assert info.subscribe_subject == "test.contract.delayed.*"
    assert info.description == "A flight is late."
    assert contract_info(HowMany).reply is Count
    assert contract_info(Count).kind is Kind.REPLY


def test_keyed_subject_ends_with_a_safe_key_token() -> None:
    info = contract_info(Delayed)
    assert subject_for(info, Delayed(flight_id="BA117", delay_minutes=5)) == "test.contract.delayed.BA117"
    assert subject_for(info, Delayed(flight_id="a.b c>*", delay_minutes=5)) == "test.contract.delayed.a_b_c__"


def test_json_schema_exports_fields_and_declaration() -> None:
    schema = json_schema(Delayed)
    assert schema["x-busagents"]["subject"] == "test.contract.delayed.*"
    assert schema["x-busagents"]["version"] == 2
    text = msgspec.json.encode(schema).decode()
    assert "delay_minutes" in text and "integer" in text
    pyd = json_schema(HowMany)
    assert pyd["properties"]["what"]["type"] == "string"
    assert pyd["x-busagents"]["reply"] == "Count"


def test_bad_declarations_are_clear_errors() -> None:
    with pytest.raises(ContractError, match="key field 'nope'"):
        event("test.x", key="nope")(type("X", (msgspec.Struct,), {"__annotations__": {"a": int}}))
    with pytest.raises(ContractError, match="invalid subject"):
        event("test.*.x")
    with pytest.raises(ContractError, match=r"msgspec\.Struct"):
        command("test.y")(dict)
    with pytest.raises(ContractError, match="not a contract"):
        contract_info(Count.__mro__[1])


def test_a_decorator_without_its_subject_or_on_a_reserved_subject_is_a_clear_error() -> None:
    with pytest.raises(ContractError, match=r'@event needs the subject first: @event\("travel.flight.delayed"\)'):

        @event  # type: ignore[arg-type]
        class Forgot(msgspec.Struct):
            n: int

    with pytest.raises(ContractError, match="@command needs the subject first"):
        command(Delayed)  # type: ignore[arg-type]
    with pytest.raises(ContractError, match=r"'busagents\.dlq\.mine' is reserved"):
        event("busagents.dlq.mine")


def test_agent_declaration_mistakes_are_caught_when_the_class_is_defined() -> None:
    with pytest.raises(ContractError, match=r"@on\(Delayed\) .*sync_handler: a handler must be 'async def'"):

        class Sync(Agent):
            @on(Delayed)  # type: ignore[type-var]
            def sync_handler(self, msg: Delayed, ctx: Context) -> None:
                pass

    with pytest.raises(ContractError, match="its message is annotated Count, but it handles Delayed"):

        class Mismatch(Agent):
            @on(Delayed)
            async def handle(self, msg: Count, ctx: Context) -> None:
                pass

    with pytest.raises(ContractError, match=r"produces must be a tuple of contract classes.*\(note the comma\)"):

        class NoComma(Agent):
            produces = Delayed  # type: ignore[assignment]
