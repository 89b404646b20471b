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
from typing import Any, Literal, TypeVar

import msgspec
import pydantic

from .errors import ContractError
from .subjects import RESERVED, is_reserved

__all__ = [
    "ContractInfo",
    "Durability",
    "Kind",
    "command",
    "contract_info",
    "event",
    "is_contract",
    "json_schema",
    "query",
    "subject_for",
    "upcaster",
    "upcasters",
]

T = TypeVar("T")
Old = TypeVar("Old")
New = TypeVar("New")

_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_\-]+$")
_KEY_UNSAFE = re.compile(r"[\s.*>]")


class Kind(enum.StrEnum):
    """How a contract is delivered."""

    EVENT = "event"  # a fact: every interested agent type gets it once
    COMMAND = "command"  # a request to act: exactly one replica of one agent type handles it
    QUERY = "query"  # request/reply with a typed reply contract
    REPLY = "reply"  # the answer to a query (declared by the query; never published on its own)


@dataclass(frozen=True, slots=True)
class Durability:
    """How a durable contract is stored (its JetStream stream) and consumed (durable pull consumers).

    ``durable=True`` on a contract means ``Durability()``: a file-backed stream per contract
    kept 7 days, consumers that allow 5 deliveries. Deployment may override ``replicas`` and
    ``ack_wait`` for every stream (``Bus(replicas=, ack_wait=)``, ``BUSAGENTS_REPLICAS``).
    """

    #: Stream name; default ``BA_<contract name>``.
    stream: str | None = None
    #: "limits" keeps messages until max_age/max_msgs (replayable, several agent types may
    #: consume); "workqueue" deletes each message once acked (one consumer per subject);
    #: "interest" keeps a message until every consumer acked it.
    retention: Literal["limits", "interest", "workqueue"] = "limits"
    #: Seconds a message is kept (0: forever).
    max_age: float = 7 * 24 * 3600.0
    #: Messages kept at most (-1: no limit); the oldest are discarded first.
    max_msgs: int = -1
    #: Stream replicas in a cluster (1 on a single server; 3 for R3).
    replicas: int = 1
    #: "file" survives a server restart; "memory" does not.
    storage: Literal["file", "memory"] = "file"
    #: Seconds within which a publish with an already seen ``Nats-Msg-Id`` is dropped.
    duplicate_window: float = 120.0
    #: Seconds a delivered message may stay unacknowledged before it is redelivered; a
    #: running handler extends it with in-progress acks, so this bounds crash recovery time.
    ack_wait: float = 30.0
    #: Deliveries of one message before it is dead-lettered.
    max_deliver: int = 5
    #: Redelivery delays in seconds after a transient failure (nak), by attempt; the last repeats.
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0)
    #: Unacknowledged messages one consumer (all replicas of an agent) may have at once.
    max_ack_pending: int = 1000
    #: Messages one replica asks for in one pull request (its local buffer).
    batch: int = 256
    #: Per-key ordering: >0 splits the keyed subjects into this many partitions with a stream
    #: subject transform; each partition has its own consumer with one message in flight, so
    #: messages of one key are handled in order even across replicas. 0: no ordering.
    ordered_partitions: int = 0


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
    durability: Durability | None = None  # set when durable

    @property
    def subscribe_subject(self) -> str:
        """The subject a consumer subscribes to: every key when the contract is keyed."""
        return f"{self.subject}.*" if self.key else self.subject


def _validate_subject(subject: str, kind: Kind) -> None:
    if not isinstance(subject, str):
        decorator = kind.value if kind is not Kind.REPLY else "event"
        raise ContractError(
            f'@{decorator} needs the subject first: @{decorator}("travel.flight.delayed") above the class '
            f"(got {subject!r})"
        )
    if is_reserved(subject):
        raise ContractError(f"subject {subject!r} is reserved for busagents ({', '.join(RESERVED)})")
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
    durable: bool | Durability,
) -> Callable[[type[T]], type[T]]:
    _validate_subject(subject, kind)
    durability = durable if isinstance(durable, Durability) else (Durability() if durable else None)
    if durability is not None:
        _validate_durability(subject, key, durability)
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
            durable=durability is not None,
            durability=durability,
            description=(cls.__doc__ or "").strip(),
            is_struct=is_struct,
        )
        cls.__busagents_contract__ = info  # type: ignore[attr-defined]
        return cls

    return decorate


def _validate_durability(subject: str, key: str | None, d: Durability) -> None:
    where = f"contract on {subject!r}"
    if d.stream is not None and not _SUBJECT_TOKEN.match(d.stream):
        raise ContractError(f"{where}: stream name {d.stream!r} must be letters, digits, '_' or '-'")
    if d.replicas < 1 or d.replicas > 5:
        raise ContractError(f"{where}: replicas must be 1..5, got {d.replicas}")
    if d.max_deliver < 1 or d.ack_wait <= 0 or d.batch < 1 or d.max_ack_pending < 1:
        raise ContractError(f"{where}: max_deliver, ack_wait, batch and max_ack_pending must be positive")
    if any(b < 0 for b in d.backoff):
        raise ContractError(f"{where}: backoff delays must be >= 0, got {d.backoff}")
    if d.ordered_partitions < 0:
        raise ContractError(f"{where}: ordered_partitions must be >= 0")
    if d.ordered_partitions and key is None:
        raise ContractError(f"{where}: ordered_partitions needs a keyed contract (key=...), order is per key")


def _field_names(cls: type[Any], is_struct: bool) -> set[str]:
    if is_struct:
        return set(cls.__struct_fields__)
    return set(cls.model_fields)


def event(
    subject: str,
    *,
    name: str | None = None,
    version: int = 1,
    key: str | None = None,
    durable: bool | Durability = False,
) -> Callable[[type[T]], type[T]]:
    """Declare an Event: a fact, fanned out to every agent type that consumes it.

    ``durable=True`` (or a :class:`Durability`) sends it through JetStream: stored, acked,
    redelivered after a crash. Default: core NATS, fast and ephemeral (at most once).
    """
    return _declare(Kind.EVENT, subject, name=name, version=version, key=key, reply=None, durable=durable)


def command(
    subject: str,
    *,
    name: str | None = None,
    version: int = 1,
    key: str | None = None,
    durable: bool | Durability = False,
) -> Callable[[type[T]], type[T]]:
    """Declare a Command: a request to act, handled by exactly one replica.

    ``durable=True`` (or a :class:`Durability`) sends it through JetStream (see :func:`event`).
    """
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


def upcaster(old: type[Old], new: type[New]) -> Callable[[Callable[[Old], New]], Callable[[Old], New]]:
    """Register the decorated function as the upcaster of contract ``old`` to ``new``, a later version::

        @event("travel.flight.delayed", name="FlightDelayed", version=1)
        class FlightDelayedV1(msgspec.Struct): ...

        @event("travel.flight.delayed", version=2)
        class FlightDelayed(msgspec.Struct): ...

        @upcaster(FlightDelayedV1, FlightDelayed)
        def delayed_v2(old: FlightDelayedV1) -> FlightDelayed:
            return FlightDelayed(flight_id=old.flight_id, delay=Delay(minutes=old.delay_minutes))

    A handler of ``new`` then also receives messages sent as ``old`` (and as any version with a
    chain of upcasters to it), converted; other versions are dead-lettered. Register it in the
    module that declares ``new``, so whoever imports the contract has its upcasters.
    """
    old_info, new_info = contract_info(old), contract_info(new)
    if old_info.name != new_info.name:
        raise ContractError(
            f"an upcaster converts versions of one contract: {old.__name__} is {old_info.name}, "
            f"{new.__name__} is {new_info.name} (declare the old class with name={new_info.name!r})"
        )
    if old_info.version >= new_info.version:
        raise ContractError(
            f"an upcaster goes to a later version: {old.__name__} is version {old_info.version}, "
            f"{new.__name__} version {new_info.version}"
        )

    def register(fn: Callable[[Old], New]) -> Callable[[Old], New]:
        registered: dict[int, tuple[type[Any], Callable[[Any], Any]]] = new.__dict__.get("__busagents_upcasters__", {})
        if old_info.version in registered:
            raise ContractError(f"{new_info.name}: an upcaster from version {old_info.version} is already registered")
        new.__busagents_upcasters__ = {**registered, old_info.version: (old, fn)}  # type: ignore[attr-defined]
        return fn

    return register


def upcasters(cls: type[T]) -> dict[int, tuple[type[Any], Callable[[Any], T]]]:
    """The earlier versions a handler of ``cls`` accepts: version -> (its contract class, the chain of
    upcasters from it to ``cls``, as one function). Empty when ``cls`` has no upcaster."""
    chains: dict[int, tuple[type[Any], Callable[[Any], T]]] = {}
    pending: list[tuple[type[Any], Callable[[Any], T]]] = [(cls, lambda message: message)]
    while pending:
        target, to_cls = pending.pop()
        for version, (source, fn) in target.__dict__.get("__busagents_upcasters__", {}).items():
            if version not in chains:
                chain = _compose(fn, to_cls)
                chains[version] = (source, chain)
                pending.append((source, chain))
    return chains


def _compose(first: Callable[[Any], Any], then: Callable[[Any], T]) -> Callable[[Any], T]:
    return lambda message: then(first(message))
