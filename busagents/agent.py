"""Agents: classes whose typed handlers are declared per contract with ``@on``.

::

    class Rebooker(Agent):
        name = "rebooker"
        produces = (BookingChanged,)

        @on(RebookPassenger)
        async def rebook(self, cmd: RebookPassenger, ctx: Context) -> BookingChanged:
            ...

A handler's return value (a contract, a list of them, or None) is published with
the envelope filled in; a query handler returns the reply. Every agent declares
what it consumes (its handlers) and what it may produce (``produces``, which also
lists the queries it sends), so a swarm forms a static graph that can be checked.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from .codec import projection_decoder
from .contract import ContractInfo, Durability, Kind, contract_info, is_contract
from .errors import ContractError

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Agent", "Handler", "on"]

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

HandlerFunc = Callable[[Any, Any, "Context"], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


@dataclass(frozen=True, slots=True)
class Handler:
    """One declared handler of an agent."""

    contract: ContractInfo
    func: HandlerFunc
    attr: str
    subject: str | None = None  # narrower subject (e.g. one key), default: every key
    durability: Durability | None = None  # JetStream delivery; None: core NATS
    view: bool = False  # every replica reads the whole stream, replayed from its start
    read_as: type[Any] | None = None  # the type each message is decoded into (a projection); None: the contract

    @property
    def durable(self) -> bool:
        return self.durability is not None and not self.view


def on(
    contract: type[Any],
    *,
    subject: str | None = None,
    durable: bool | Durability | None = None,
    view: bool = False,
    read_as: type[Any] | None = None,
) -> Callable[[F], F]:
    """Declare the decorated method as the handler of ``contract``.

    ``subject`` narrows the subscription, e.g. ``"travel.flight.delayed.BA117"`` to
    handle one key only; it must lie under the contract's subject.

    ``durable`` overrides the contract's choice for this subscription: ``True`` (or a
    :class:`Durability`) consumes it from a JetStream stream with a durable consumer
    shared by the agent's replicas, ``False`` on core NATS. Default: as the contract says.
    The handler code is the same either way.

    ``view=True`` is for agents that keep a materialised view (see :mod:`busagents.view`):
    *every* replica reads *every* message of the contract's stream, replayed from the
    stream's start when the replica starts, in order; the agent's query handlers serve
    only once these replays caught up. The contract must be durable (it has a stream).

    ``read_as`` hands the handler each message decoded into that msgspec type instead of the
    contract: a projection, shaped like the contract or like the part of it the handler reads
    (fields it does not name are skipped, a ``msgspec.Raw`` field keeps its JSON undecoded). For
    a handler that reads a little of large messages, every replica of a view above all. The
    message is checked only as far as the projection reads it; one that does not decode into
    it is dead-lettered like any undecodable message. A message of an earlier version is
    upcast to the contract first, then projected.
    """
    info = contract_info(contract)
    if durable and info.kind in (Kind.QUERY, Kind.REPLY):
        raise ContractError(f"@on({info.name}, durable=...): queries are request/reply and cannot be durable")
    if view and info.durability is None:
        raise ContractError(
            f"@on({info.name}, view=True): a view replays the contract's stream, but {info.name} is not durable; "
            "declare it durable=True (or a Durability) so that a stream keeps it"
        )
    if view and durable is not None:
        raise ContractError(f"@on({info.name}, view=True): a view reads the contract's own stream; drop durable=")
    if durable is None:
        durability = info.durability
    elif isinstance(durable, Durability):
        durability = durable
    else:
        durability = (info.durability or Durability()) if durable else None
    if subject is not None and not (subject == info.subject or subject.startswith(info.subject + ".")):
        raise ContractError(f"@on({info.name}, subject={subject!r}): must start with {info.subject!r}")
    if read_as is not None:
        projection_decoder(info.cls, read_as)  # a clear error now for a type msgspec cannot decode into

    def mark(func: F) -> F:
        where = f"@on({info.name}) {getattr(func, '__qualname__', func)!s}"
        if not inspect.iscoroutinefunction(cast(Any, func)):  # cast: keep F, not the guard type
            raise ContractError(f"{where}: a handler must be 'async def'")
        declared = _message_annotation(func)
        if isinstance(declared, type) and is_contract(declared) and declared is not contract:
            raise ContractError(
                f"{where}: its message is annotated {declared.__name__}, but it handles {contract.__name__}"
            )
        if read_as is not None and isinstance(declared, type) and declared is not read_as:
            raise ContractError(
                f"{where}: its message is annotated {declared.__name__}, but read_as={read_as.__name__} is what it gets"
            )
        func.__busagents_on__ = (info, subject, durability, view, read_as)  # type: ignore[attr-defined]
        return func

    return mark


class Agent:
    """Base class of agents. Subclass it, set ``name`` and ``produces``, add ``@on`` handlers."""

    #: Unique agent type name: queue group, dead-letter subject and plugin name derive from it.
    name: ClassVar[str] = ""
    #: Contracts this agent may publish, and the queries it may send.
    produces: ClassVar[tuple[type[Any], ...]] = ()
    #: Contracts a handler waits for on a subscription of its own, confirming each to its sender
    #: (the answer to something it produced, e.g. :class:`~busagents.llm.ApprovalDecided`).
    awaits: ClassVar[tuple[type[Any], ...]] = ()
    #: How many messages one replica handles at once.
    max_concurrency: ClassVar[int] = 8
    #: JetStream key-value buckets this agent keeps state in (``ctx.state(bucket, Type)``).
    state_buckets: ClassVar[tuple[str, ...]] = ()
    #: True for an agent that must run as exactly one instance (it keeps state no replica could
    #: share): ``swarm check`` reports a swarm that gives it replicas as an error and ``swarm up`` refuses it.
    singleton: ClassVar[bool] = False
    #: True for an agent that answers people as they wait (a chat): ``swarm up`` leaves it the OS's
    #: normal scheduling, where the others run as ``SCHED_BATCH`` (swarm.toml ``scheduling``).
    interactive: ClassVar[bool] = False

    handlers: ClassVar[dict[type[Any], Handler]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__)
        if not _NAME.match(cls.name):
            raise ContractError(f"agent name {cls.name!r} of {cls.__qualname__} must be letters, digits, '_' or '-'")
        for attr in ("produces", "awaits"):
            declared = getattr(cls, attr)
            if not isinstance(declared, tuple | list) or not all(isinstance(c, type) for c in declared):
                raise ContractError(
                    f"{cls.__qualname__}.{attr} must be a tuple of contract classes, e.g. {attr} = (BookingChanged,) "
                    f"(note the comma), not {declared!r}"
                )
        if cls.max_concurrency < 1:
            raise ContractError(f"{cls.__qualname__}.max_concurrency must be >= 1")
        if isinstance(cls.state_buckets, str) or not all(
            isinstance(b, str) and _NAME.match(b) for b in cls.state_buckets
        ):
            raise ContractError(
                f"{cls.__qualname__}.state_buckets must be a tuple of bucket names (letters, digits, '_' or '-'), "
                f"not {cls.state_buckets!r}"
            )
        handlers: dict[type[Any], Handler] = {}
        for base in reversed(cls.__mro__):
            for attr, value in vars(base).items():
                mark = getattr(value, "__busagents_on__", None)
                if mark is None:
                    continue
                info, subject, durability, view, read_as = mark
                previous = handlers.get(info.cls)
                if previous is not None and previous.attr != attr and base is cls and previous.attr in vars(cls):
                    raise ContractError(
                        f"{cls.__qualname__}: {info.name} is handled twice ({previous.attr} and {attr})"
                    )
                handlers[info.cls] = Handler(
                    contract=info,
                    func=value,
                    attr=attr,
                    subject=subject,
                    durability=durability,
                    view=view,
                    read_as=read_as,
                )
        cls.handlers = handlers
        for declared in (*cls.produces, *cls.awaits):
            contract_info(declared)  # raises a clear error for a non-contract

    @classmethod
    def consumes(cls) -> tuple[type[Any], ...]:
        """Contracts this agent handles."""
        return tuple(cls.handlers)

    @classmethod
    def may_produce(cls, contract: type[Any]) -> bool:
        return contract in cls._produced_set()

    @classmethod
    def _produced_set(cls) -> frozenset[type[Any]]:
        cached: frozenset[type[Any]] | None = cls.__dict__.get("_produced_cache")
        if cached is None:
            cached = frozenset(cls.produces)
            cls._produced_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def declaration(cls) -> dict[str, Any]:
        """The agent's place in the swarm graph, by contract name."""
        return {
            "agent": cls.name,
            "consumes": [
                {
                    "contract": h.contract.name,
                    "kind": h.contract.kind.value,
                    "subject": h.subject,
                    "durable": h.durable,
                    "view": h.view,
                }
                for h in cls.handlers.values()
            ],
            "produces": [
                {"contract": contract_info(c).name, "kind": contract_info(c).kind.value} for c in cls.produces
            ],
            "state": list(cls.state_buckets),
            "singleton": cls.singleton,
        }

    # Lifecycle hooks: override as needed.

    async def on_start(self, ctx: Context) -> None:
        """Called once before the first message is handled."""

    async def run(self, ctx: Context) -> None:
        """Optional long-running loop (e.g. watching an external feed); cancelled on drain."""

    async def on_stop(self, ctx: Context) -> None:
        """Called once after the last in-flight message was handled."""


def _message_annotation(func: Callable[..., Any]) -> Any:
    """The annotation of a handler's message parameter (after ``self``), resolved if it can be; else None."""
    params = list(inspect.signature(func).parameters.values())
    if len(params) < 2:
        return None
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        return None
    return hints.get(params[1].name)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
