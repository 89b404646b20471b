"""Is a contract's new JSON Schema compatible with its old one under the same version?

:func:`compare_schemas` is a pure function over two JSON Schemas (as
:func:`busagents.contract.json_schema` writes them; ``$ref``s into ``$defs`` are resolved)
that lists what changed, each change breaking or compatible:

- breaking: a removed field, a retyped field, a new required field (no default), a field
  made required, a narrowed enum or ``Literal``, a changed subject, kind or key;
- compatible: a new field with a default, a field made optional, a widened enum or type.

Constraints (``minimum``, ``pattern``...), titles and descriptions are not compared.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["Change", "ChangeKind", "compare_schemas"]

Schema = dict[str, Any]


class ChangeKind(enum.StrEnum):
    """The kinds of change :func:`compare_schemas` reports."""

    REMOVED_FIELD = "removed field"
    RETYPED_FIELD = "retyped field"
    NEW_REQUIRED_FIELD = "new required field"
    MADE_REQUIRED = "field made required"
    NARROWED_ENUM = "narrowed enum"
    CHANGED_DECLARATION = "changed declaration"
    NEW_OPTIONAL_FIELD = "new optional field"
    MADE_OPTIONAL = "field made optional"
    WIDENED_ENUM = "widened enum"
    WIDENED_TYPE = "widened type"
    CHANGED_DELIVERY = "changed delivery"

    @property
    def breaking(self) -> bool:
        return self in _BREAKING


_BREAKING = frozenset(
    {
        ChangeKind.REMOVED_FIELD,
        ChangeKind.RETYPED_FIELD,
        ChangeKind.NEW_REQUIRED_FIELD,
        ChangeKind.MADE_REQUIRED,
        ChangeKind.NARROWED_ENUM,
        ChangeKind.CHANGED_DECLARATION,
    }
)


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two schemas of a contract: where (a field path, ``$`` for the body) and what."""

    kind: ChangeKind
    path: str
    detail: str = ""

    @property
    def breaking(self) -> bool:
        return self.kind.breaking

    def __str__(self) -> str:
        return f"{self.path}: {self.kind.value}" + (f" ({self.detail})" if self.detail else "")


def compare_schemas(old: Schema, new: Schema) -> list[Change]:
    """What changed from ``old`` to ``new``, breaking changes first, each in path order."""
    changes = list(_declaration(old.get("x-busagents") or {}, new.get("x-busagents") or {}))
    changes += _Comparison(old, new).compare(old, new, "$")
    return sorted(changes, key=lambda c: (not c.breaking, c.path, c.kind.value))


def _declaration(old: dict[str, Any], new: dict[str, Any]) -> Iterator[Change]:
    for key in ("kind", "subject", "key", "reply"):
        if old.get(key) != new.get(key):
            yield Change(ChangeKind.CHANGED_DECLARATION, "$", f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    if old.get("durable") != new.get("durable"):
        yield Change(ChangeKind.CHANGED_DELIVERY, "$", f"durable {old.get('durable')} -> {new.get('durable')}")


class _Comparison:
    """One comparison: the two documents whose ``$defs`` the ``$ref``s point into."""

    def __init__(self, old_root: Schema, new_root: Schema) -> None:
        self._roots = (old_root, new_root)
        self._open: set[tuple[str, str]] = set()  # the (old, new) $refs being compared: recursive types end

    def compare(self, old: Schema, new: Schema, path: str) -> list[Change]:
        refs = (old.get("$ref", ""), new.get("$ref", ""))
        if not (refs[0] and refs[1]):
            return self._compare(old, new, path)
        if refs in self._open:
            return []
        self._open.add(refs)
        try:
            return self._compare(old, new, path)
        finally:
            self._open.discard(refs)

    def _compare(self, old: Schema, new: Schema, path: str) -> list[Change]:
        old, new = self._resolve(old, 0), self._resolve(new, 1)
        old_alts, new_alts = _alternatives(old, self._roots[0]), _alternatives(new, self._roots[1])
        changes: list[Change] = []
        for label, old_alt in old_alts.items():
            new_alt = new_alts.get(label)
            if new_alt is None and label == "integer":
                new_alt = new_alts.get("number")  # every integer is a number
            if new_alt is None:
                detail = f"{_describe(old_alts)} -> {_describe(new_alts)}"
                return [Change(ChangeKind.RETYPED_FIELD, path, detail)]
            changes += self._same_type(label, old_alt, new_alt, path)
        widened = [
            label for label in new_alts if label not in old_alts and not (label == "number" and "integer" in old_alts)
        ]
        if widened:
            detail = f"{_describe(old_alts)} -> {_describe(new_alts)}"
            changes.append(Change(ChangeKind.WIDENED_TYPE, path, detail))
        return changes

    def _resolve(self, schema: Schema, side: int) -> Schema:
        return _resolve(schema, self._roots[side])

    def _same_type(self, label: str, old: Schema, new: Schema, path: str) -> list[Change]:
        if label == "enum":
            return _enum(old, new, path)
        if label.startswith("object"):
            return self._object(old, new, path)
        if label == "array":
            return self.compare(_items(old), _items(new), f"{path}[]")
        return []

    def _object(self, old: Schema, new: Schema, path: str) -> list[Change]:
        changes: list[Change] = []
        old_props: dict[str, Schema] = old.get("properties", {})
        new_props: dict[str, Schema] = new.get("properties", {})
        old_required, new_required = set(old.get("required", ())), set(new.get("required", ()))
        prefix = "" if path == "$" else f"{path}."
        for name, old_field in old_props.items():
            where = f"{prefix}{name}"
            if name not in new_props:
                changes.append(Change(ChangeKind.REMOVED_FIELD, where))
                continue
            if name in new_required and name not in old_required:
                changes.append(Change(ChangeKind.MADE_REQUIRED, where, "it had a default"))
            elif name in old_required and name not in new_required:
                changes.append(Change(ChangeKind.MADE_OPTIONAL, where))
            changes += self.compare(old_field, new_props[name], where)
        for name in new_props.keys() - old_props.keys():
            if name in new_required:
                changes.append(Change(ChangeKind.NEW_REQUIRED_FIELD, f"{prefix}{name}", "no default"))
            else:
                changes.append(Change(ChangeKind.NEW_OPTIONAL_FIELD, f"{prefix}{name}"))
        if "additionalProperties" in old or "additionalProperties" in new:  # a dict's values
            old_values, new_values = old.get("additionalProperties", {}), new.get("additionalProperties", {})
            if isinstance(old_values, dict) and isinstance(new_values, dict):
                changes += self.compare(old_values, new_values, f"{path}{{}}")
        return changes


def _resolve(schema: Schema, root: Schema) -> Schema:
    """``schema`` with a ``$ref`` to ``#/$defs/...`` of ``root`` replaced by its target (siblings kept)."""
    seen = 0
    while "$ref" in schema and seen < 32:
        ref: str = schema["$ref"]
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target}
        seen += 1
    return schema


def _alternatives(schema: Schema, root: Schema) -> dict[str, Schema]:
    """The types a value of ``schema`` may have, by label (``string``, ``enum``, ``object``...)."""
    alts: dict[str, Schema] = {}
    branches = schema.get("anyOf") or schema.get("oneOf")
    if branches:
        objects = [_resolve(b, root) for b in branches if _resolve(b, root).get("type") == "object"]
        for branch in branches:
            branch = _resolve(branch, root)
            for label, alt in _alternatives(branch, root).items():
                if label == "object" and len(objects) > 1:  # a union of structs: tell them apart by name
                    label = f"object:{alt.get('title', '')}"
                alts[label] = alt
        return alts
    if "enum" in schema or "const" in schema:
        return {"enum": schema}
    types = schema.get("type")
    if types is None:
        return {"any": schema}
    for t in [types] if isinstance(types, str) else types:
        alts[t] = {**schema, "type": t}
    return alts


def _items(schema: Schema) -> Schema:
    items = schema.get("items", {})
    return items if isinstance(items, dict) else {}


def _enum(old: Schema, new: Schema, path: str) -> list[Change]:
    old_values, new_values = _enum_values(old), _enum_values(new)
    removed = [v for v in old_values if v not in new_values]
    added = [v for v in new_values if v not in old_values]
    changes = []
    if removed:
        changes.append(Change(ChangeKind.NARROWED_ENUM, path, "removed " + ", ".join(map(repr, removed))))
    if added:
        changes.append(Change(ChangeKind.WIDENED_ENUM, path, "added " + ", ".join(map(repr, added))))
    return changes


def _enum_values(schema: Schema) -> list[Any]:
    return list(schema["enum"]) if "enum" in schema else [schema.get("const")]


def _describe(alts: dict[str, Schema]) -> str:
    return " | ".join(alts) or "nothing"
