"""compare_schemas: each kind of breaking and compatible change between two schemas of one contract version."""

from __future__ import annotations

import enum
from typing import Any, Literal

import msgspec
import pydantic

from busagents.compatibility import Change, ChangeKind, compare_schemas


def changes(old: type[Any], new: type[Any]) -> list[tuple[ChangeKind, str]]:
    return [(c.kind, c.path) for c in compare_schemas(msgspec.json.schema(old), msgspec.json.schema(new))]


class Leg(msgspec.Struct):
    flight: str
    seat: str


class LegNarrow(msgspec.Struct):
    flight: int
    seat: str


class Cabin(enum.Enum):
    ECONOMY = "economy"
    BUSINESS = "business"


class CabinWider(enum.Enum):
    ECONOMY = "economy"
    BUSINESS = "business"
    FIRST = "first"


class Base(msgspec.Struct):
    flight_id: str
    delay: int
    status: Literal["late", "cancelled"]
    note: str = ""


def test_identical_schemas_have_no_changes() -> None:
    assert changes(Base, Base) == []


def test_a_removed_field_breaks() -> None:
    class New(msgspec.Struct):
        flight_id: str
        status: Literal["late", "cancelled"]
        note: str = ""

    assert changes(Base, New) == [(ChangeKind.REMOVED_FIELD, "delay")]


def test_a_retyped_field_breaks() -> None:
    class New(msgspec.Struct):
        flight_id: str
        delay: str
        status: Literal["late", "cancelled"]
        note: str = ""

    (change,) = compare_schemas(msgspec.json.schema(Base), msgspec.json.schema(New))
    assert (change.kind, change.path, change.breaking) == (ChangeKind.RETYPED_FIELD, "delay", True)
    assert str(change) == "delay: retyped field (integer -> string)"


def test_a_new_required_field_breaks_and_a_new_field_with_a_default_passes() -> None:
    class New(msgspec.Struct):
        flight_id: str
        delay: int
        status: Literal["late", "cancelled"]
        gate: str
        note: str = ""
        terminal: str | None = None

    assert changes(Base, New) == [(ChangeKind.NEW_REQUIRED_FIELD, "gate"), (ChangeKind.NEW_OPTIONAL_FIELD, "terminal")]


def test_a_field_made_required_breaks_and_one_made_optional_passes() -> None:
    class New(msgspec.Struct):
        flight_id: str
        note: str
        status: Literal["late", "cancelled"]
        delay: int = 0

    assert changes(Base, New) == [(ChangeKind.MADE_REQUIRED, "note"), (ChangeKind.MADE_OPTIONAL, "delay")]


def test_a_narrowed_literal_breaks_and_a_widened_one_passes() -> None:
    class Narrow(msgspec.Struct):
        flight_id: str
        delay: int
        status: Literal["late"]
        note: str = ""

    class Wide(msgspec.Struct):
        flight_id: str
        delay: int
        status: Literal["late", "cancelled", "diverted"]
        note: str = ""

    assert changes(Base, Narrow) == [(ChangeKind.NARROWED_ENUM, "status")]
    assert changes(Base, Wide) == [(ChangeKind.WIDENED_ENUM, "status")]


def test_enums_behind_refs_are_compared_by_value() -> None:
    class Old(msgspec.Struct):
        cabin: Cabin

    class New(msgspec.Struct):
        cabin: CabinWider

    assert changes(Old, New) == [(ChangeKind.WIDENED_ENUM, "cabin")]
    assert changes(New, Old) == [(ChangeKind.NARROWED_ENUM, "cabin")]


def test_nested_structs_in_lists_and_dicts_are_compared_field_by_field() -> None:
    class Old(msgspec.Struct):
        legs: list[Leg]
        by_id: dict[str, Leg]

    class New(msgspec.Struct):
        legs: list[LegNarrow]
        by_id: dict[str, LegNarrow]

    assert changes(Old, New) == [
        (ChangeKind.RETYPED_FIELD, "by_id{}.flight"),
        (ChangeKind.RETYPED_FIELD, "legs[].flight"),
    ]


def test_a_widened_type_passes_and_a_narrowed_one_breaks() -> None:
    class Old(msgspec.Struct):
        gate: str
        delay: int

    class New(msgspec.Struct):
        gate: str | None
        delay: float

    assert changes(Old, New) == [(ChangeKind.WIDENED_TYPE, "gate")]
    assert changes(New, Old) == [(ChangeKind.RETYPED_FIELD, "delay"), (ChangeKind.RETYPED_FIELD, "gate")]


class Node(msgspec.Struct):
    name: str
    children: list[Node] = []


def test_recursive_types_end() -> None:
    assert changes(Node, Node) == []


def test_pydantic_schemas_compare_like_msgspec_ones() -> None:
    class Old(pydantic.BaseModel):
        flight_id: str
        delay: int

    class New(pydantic.BaseModel):
        flight_id: str
        gate: str = "A1"

    found = compare_schemas(Old.model_json_schema(), New.model_json_schema())
    assert [(c.kind, c.path, c.breaking) for c in found] == [
        (ChangeKind.REMOVED_FIELD, "delay", True),
        (ChangeKind.NEW_OPTIONAL_FIELD, "gate", False),
    ]


def test_a_changed_subject_or_kind_breaks_and_changed_durability_passes() -> None:
    old = {"type": "object", "x-busagents": {"kind": "event", "subject": "a.b", "key": None, "durable": False}}
    new = {"type": "object", "x-busagents": {"kind": "event", "subject": "a.c", "key": None, "durable": True}}
    assert compare_schemas(old, new) == [
        Change(ChangeKind.CHANGED_DECLARATION, "$", "subject 'a.b' -> 'a.c'"),
        Change(ChangeKind.CHANGED_DELIVERY, "$", "durable False -> True"),
    ]
