"""Contracts: typed messages with a stable name, a version and a subject.

A contract is a ``msgspec.Struct`` (the fast path) or a ``pydantic.BaseModel``
declared with one of the decorators :func:`event`, :func:`command` or :func:`query`::

    @event("travel.flight.delayed", key="flight_id")
    class FlightDelayed(msgspec.Struct):
        flight_id: str
        delay_minutes: int

The subject of a keyed contract ends with the key's value
(``travel.flight.delayed.BA117``), so consumers may filter and JetStream keeps
per-key order.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import pydantic

from .errors import ContractError

__all__ = [
    "ContractInfo",
    "Kind",
    "command",
    "contract_info",
    "event",
    "is_contract",
    "json_schema",
    "query",
    "subject_for",
]

T = TypeVar("T")

_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_KEY_UNSAFE = re.compile(r"[\s.*>]")


class Kind(enum.StrEnum):
    """How a contract is delivered."""

    EVENT = "event"  # a fact: every interested agent type gets it once
    COMMAND = "command"  # a request to act: exactly one replica of one agent type handles it
    QUERY = "query"  # request/reply with a typed reply contract
    REPLY = "reply"  # the answer to a query (declared by the query; never published on its own)


@dataclass(frozen=True, slots=True)
class ContractInfo:
    """What the framework knows of one contract class."""

    cls: type[Any]
    kind: Kind
    name: str
    version: int
    subject: str  # the base subject, without the key token
    key: str | None = None
    reply: type[Any] | None = None
    durable: bool = False
    description: str = ""
    is_struct: bool = field(default=True)

    @property
    def subscribe_subject(self) -> str:
        """The subject a consumer subscribes to: every key when the contract is keyed."""
        return f"{self.subject}.*" if self.key else self.subject


def _validate_subject(subject: str) -> None:
    tokens = subject.split(".")
    if not subject or not all(_SUBJECT_TOKEN.match(t) for t in tokens):
        raise ContractError(
            f"invalid subject {subject!r}: use dot-separated tokens of letters, digits, '_' or '-' "
            "(wildcards are added by the framework)"
        )


def _declare(
    kind: Kind,
    subject: str,
    *,
    name: str | None,
    version: int,
    key: str | None,
    reply: type[Any] | None,
    durable: bool,
) -> Callable[[type[T]], type[T]]:
    _validate_subject(subject)
    if version < 1:
        raise ContractError(f"contract version must be >= 1, got {version}")

    def decorate(cls: type[T]) -> type[T]:
        is_struct = isinstance(cls, type) and issubclass(cls, msgspec.Struct)
        if not is_struct and not (isinstance(cls, type) and issubclass(cls, pydantic.BaseModel)):
            raise ContractError(
                f"{cls!r} cannot be a contract: subclass msgspec.Struct (fast path) or pydantic.BaseModel"
            )
        fields = _field_names(cls, is_struct)
        if key is not None and key not in fields:
            raise ContractError(f"{cls.__name__}: key field {key!r} is not one of its fields {sorted(fields)}")
        if kind is Kind.QUERY:
            if reply is None:
                raise ContractError(f"query {cls.__name__} needs reply=<contract class>")
            if not is_contract(reply):
                _declare(Kind.REPLY, subject, name=None, version=1, key=None, reply=None, durable=False)(reply)
        elif reply is not None and kind is not Kind.REPLY:
            raise ContractError(f"{kind.value} {cls.__name__} cannot declare a reply; only queries do")
        info = ContractInfo(
            cls=cls,
            kind=kind,
            name=name or cls.__name__,
            version=version,
            subject=subject,
            key=key,
            reply=reply,
            durable=durable,
            description=(cls.__doc__ or "").strip(),
            is_struct=is_struct,
        )
        cls.__busagents_contract__ = info  # type: ignore[attr-defined]
        return cls

    return decorate


def _field_names(cls: type[Any], is_struct: bool) -> set[str]:
    if is_struct:
        return set(cls.__struct_fields__)
    return set(cls.model_fields)


def event(
    subject: str, *, name: str | None = None, version: int = 1, key: str | None = None, durable: bool = False
) -> Callable[[type[T]], type[T]]:
    """Declare an Event: a fact, fanned out to every agent type that consumes it."""
    return _declare(Kind.EVENT, subject, name=name, version=version, key=key, reply=None, durable=durable)


def command(
    subject: str, *, name: str | None = None, version: int = 1, key: str | None = None, durable: bool = False
) -> Callable[[type[T]], type[T]]:
    """Declare a Command: a request to act, handled by exactly one replica."""
    return _declare(Kind.COMMAND, subject, name=name, version=version, key=key, reply=None, durable=durable)


def query(
    subject: str, *, reply: type[Any], name: str | None = None, version: int = 1, key: str | None = None
) -> Callable[[type[T]], type[T]]:
    """Declare a Query: request/reply, answered with an instance of ``reply``."""
    return _declare(Kind.QUERY, subject, name=name, version=version, key=key, reply=reply, durable=False)


def is_contract(obj: Any) -> bool:
    """True for a contract class or an instance of one."""
    cls = obj if isinstance(obj, type) else type(obj)
    return "__busagents_contract__" in cls.__dict__


def contract_info(cls: type[Any]) -> ContractInfo:
    """The declaration of ``cls``; raises ContractError when it is not a contract."""
    try:
        info: ContractInfo = cls.__dict__["__busagents_contract__"]
    except (KeyError, AttributeError):
        name = getattr(cls, "__name__", repr(cls))
        raise ContractError(
            f"{name} is not a contract: decorate it with @event, @command or @query from busagents"
        ) from None
    return info


def subject_for(info: ContractInfo, message: Any) -> str:
    """The concrete subject of one message: the base subject plus its key token, if keyed."""
    if info.key is None:
        return info.subject
    value = str(getattr(message, info.key))
    if not value:
        raise ContractError(f"{info.name}: key field {info.key!r} is empty; a keyed message needs a key")
    return f"{info.subject}.{_KEY_UNSAFE.sub('_', value)}"


def json_schema(cls: type[Any]) -> dict[str, Any]:
    """The JSON Schema of a contract's body, with its busagents declaration under ``x-busagents``."""
    info = contract_info(cls)
    if info.is_struct:
        schema: dict[str, Any] = msgspec.json.schema(cls)
    else:
        schema = cls.model_json_schema()
    schema["x-busagents"] = {
        "name": info.name,
        "version": info.version,
        "kind": info.kind.value,
        "subject": info.subscribe_subject,
        "key": info.key,
        "durable": info.durable,
        **({"reply": contract_info(info.reply).name} if info.reply is not None else {}),
    }
    return schema
