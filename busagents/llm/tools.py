"""Tools the model may call, made from contracts: a Query is a tool, the decision is a tool.

A query tool's input schema is the query contract's JSON Schema; calling it sends the typed
query over the bus and feeds the typed reply back as JSON. The decision tool's input schema
is the decision contract's, and its input is only accepted once the contract's codec has
decoded it: nothing the model writes leaves the agent without passing that check.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
import pydantic

from ..codec import Codec, codec_for, encode
from ..contract import ContractInfo, Kind, contract_info, is_contract, json_schema
from ..errors import ConfigError, DecodeError

__all__ = ["DecisionTool", "QueryTool", "input_schema", "tool_name"]

_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")
_json = msgspec.json.Encoder()


def tool_name(contract_name: str) -> str:
    """The tool name of a contract: snake_case, at most 64 of the characters the API accepts."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", contract_name).lower()
    return _TOOL_NAME.sub("_", snake)[:64]


def _typed(cls: type[Any]) -> ContractInfo:
    """The declaration of a contract, or a stand-in for a plain Struct / BaseModel (never published)."""
    if is_contract(cls):
        return contract_info(cls)
    is_struct = isinstance(cls, type) and issubclass(cls, msgspec.Struct)
    if not is_struct and not (isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)):
        raise ConfigError(f"{cls!r} cannot be a decision: use a contract, a msgspec.Struct or a pydantic.BaseModel")
    doc = (cls.__doc__ or "").strip()
    return ContractInfo(cls, Kind.REPLY, cls.__name__, 1, "", description=doc, is_struct=is_struct)


def input_schema(cls: type[Any], *, closed: bool = False) -> dict[str, Any]:
    """The JSON Schema of a contract (or Struct / BaseModel) shaped as a tool ``input_schema``.

    The root is an object; ``closed`` adds ``additionalProperties: false`` so the model is
    told no other field exists.
    """
    info = _typed(cls)
    if is_contract(cls):
        schema = dict(json_schema(cls))
    else:
        schema = dict(msgspec.json.schema(cls) if info.is_struct else cls.model_json_schema())
    schema.pop("x-busagents", None)
    ref = schema.pop("$ref", None)
    defs: dict[str, Any] = dict(schema.pop("$defs", {}))
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        root = dict(defs.pop(ref.removeprefix("#/$defs/")))
        root.update({k: v for k, v in schema.items() if k not in root})
    else:
        root = schema
    if root.get("type") != "object":
        raise ConfigError(f"{info.name}: a tool input must be an object, its schema is {root!r}")
    if closed:
        root["additionalProperties"] = False
    root.pop("title", None)
    if defs:
        root["$defs"] = defs
    return root


def _fields(cls: type[Any]) -> frozenset[str]:
    return frozenset(cls.__struct_fields__ if _typed(cls).is_struct else cls.model_fields)


class QueryTool:
    """A bus Query offered to the model as a tool.

    ``render`` turns the typed reply into the tool result's text (default: its JSON), e.g. to
    leave out what the model does not need; it sees only what the query returned.
    """

    __slots__ = ("_render", "contract", "definition", "name", "reply")

    def __init__(
        self,
        contract: type[Any],
        *,
        description: str | None = None,
        render: Callable[[Any], str] | None = None,
    ) -> None:
        info = contract_info(contract)
        if info.kind is not Kind.QUERY or info.reply is None:
            raise ConfigError(f"{info.name} is a {info.kind.value}: only queries can be tools the model calls")
        self.contract = contract
        self.reply: type[Any] = info.reply
        self.name = tool_name(info.name)
        reply_info = contract_info(info.reply)
        text = description or info.description or f"Send the query {info.name}."
        text += f" Returns {reply_info.name} as JSON" + (
            f": {reply_info.description}" if reply_info.description else "."
        )
        self.definition: dict[str, Any] = {
            "name": self.name,
            "description": text,
            "input_schema": input_schema(contract),
        }
        self._render = render

    def parse(self, arguments: dict[str, Any]) -> Any:
        """The typed query from the model's tool input; raises DecodeError naming the field."""
        return codec_for(self.contract).decode(_json.encode(arguments))

    def render(self, reply: Any) -> str:
        """The reply as the text of a tool result."""
        if self._render is not None:
            return self._render(reply)
        return encode(reply).decode()


class DecisionTool:
    """The tool whose input is the decision contract; the model's only way to answer.

    The decision is a contract (published as it is), or a plain Struct / BaseModel that the
    agent turns into the contract it publishes (so the model never writes ids or prices).
    """

    __slots__ = ("codec", "contract", "definition", "fields", "name")

    def __init__(self, contract: type[Any], *, name: str = "decide", description: str | None = None) -> None:
        info = _typed(contract)
        if info.kind is Kind.QUERY:
            raise ConfigError(f"{info.name} is a query; a decision is an event or a command")
        self.contract = contract
        self.codec = codec_for(contract) if is_contract(contract) else Codec(info)
        self.name = name
        self.fields = _fields(contract)
        text = description or (
            f"Submit the final decision as {info.name}. "
            + (info.description + " " if info.description else "")
            + "Call this exactly once, when you have the context you need."
        )
        self.definition: dict[str, Any] = {
            "name": name,
            "description": text,
            "input_schema": input_schema(contract, closed=True),
        }

    def parse(self, arguments: dict[str, Any]) -> Any:
        """The decision, decoded by the contract's codec; raises DecodeError saying what to fix."""
        unknown = sorted(set(arguments) - self.fields)
        if unknown:
            raise DecodeError(
                f"{self.codec.info.name}: unknown field(s) {', '.join(unknown)}; "
                f"the only fields are {', '.join(sorted(self.fields))}"
            )
        return self.codec.decode(_json.encode(arguments))
