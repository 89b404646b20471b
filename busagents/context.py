"""What a handler receives besides its message: publish, request, ids, a logger."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .contract import contract_info
from .durable import derived_id
from .envelope import REPLAY_OF, Envelope
from .errors import ConfigError, UndeclaredContractError

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .agent import Agent
    from .bus import Bus
    from .state import State
    from .view import ViewConsumer

__all__ = ["Context"]

T = TypeVar("T")


class Context:
    """The handler's view of the bus, scoped to the message being handled.

    Everything published or requested through it joins the conversation of the
    message being handled, with that message as its cause. Outside a handler
    (``on_start``, ``run``) there is no cause: each publish starts a conversation
    unless ``conversation_id`` is given.
    """

    __slots__ = (
        "_data",
        "_derive_ids",
        "_envelope",
        "_headers",
        "_llm",
        "_message_id",
        "_published",
        "_views",
        "agent",
        "bus",
        "log",
        "subject",
    )

    def __init__(
        self,
        agent: Agent,
        bus: Bus,
        log: logging.Logger,
        headers: dict[str, str] | None = None,
        subject: str = "",
        envelope: Envelope | None = None,
        *,
        data: bytes = b"",
        derive_ids: bool = False,
        views: Sequence[ViewConsumer] = (),
    ) -> None:
        self.agent = agent
        self.bus = bus
        self.log = log
        self.subject = subject
        self._headers = headers
        self._envelope = envelope
        self._data = data
        self._message_id: str | None = None
        self._derive_ids = derive_ids
        self._published = 0
        self._views = views
        self._llm: str | None = None

    @property
    def envelope(self) -> Envelope | None:
        """The envelope of the message being handled (None outside a handler)."""
        if self._envelope is None and self._headers is not None:
            self._envelope = Envelope.from_headers(self._headers)
        return self._envelope

    @property
    def message_id(self) -> str | None:
        """The identity of the message being handled: the key for idempotent side effects.

        ``<id>:<digest of the body>``, where ``<id>`` is the message's ``Nats-Msg-Id`` (for a
        durable message sent without one, its stream and sequence), or the original's on a
        ``busagents dlq replay`` (``Ba-Replay-Of``). An id from the wire counts
        only together with the bytes it names: the same across redeliveries and replays of the
        same bytes, different for different bytes whatever ids they claim. Durable outputs
        derive their ids from it. See :mod:`busagents.idempotency`.
        """
        if self._message_id is None:
            env = self.envelope
            if env is None:
                return None
            replayed = self._headers.get(REPLAY_OF) if self._headers is not None else None
            self._message_id = message_identity(replayed or env.id, self._data)
        return self._message_id

    @property
    def conversation_id(self) -> str | None:
        env = self.envelope
        return env.conversation_id if env is not None else None

    def _check(self, message: Any) -> None:
        cls = type(message)
        if not self.agent.may_produce(cls):
            name = contract_info(cls).name
            raise UndeclaredContractError(
                f"agent {self.agent.name!r} may not send {name}: add it to {type(self.agent).__name__}.produces"
            )

    async def publish(self, message: Any, *, conversation_id: str | None = None, msg_id: str | None = None) -> Envelope:
        """Publish a declared Event or Command, caused by the message being handled.

        In a durable handler the n-th publish gets an id derived from :attr:`message_id`, so a
        redelivery (or a replay of the same bytes) republishes the same ids and the copies are
        dropped, while a different message never shares them. ``msg_id``
        gives an id of your own instead (stable across retries, e.g. from your state), for a
        message that another delivery than this one may have to publish again.
        """
        self._check(message)
        if self._derive_ids:
            cause_id = self.message_id
            if msg_id is None and cause_id is not None:
                msg_id = derived_id(cause_id, self.agent.name, self._published)
            self._published += 1
        if self._llm is not None:
            info = contract_info(type(message))
            envelope = Envelope.new(
                info.name,
                info.version,
                sender=self.agent.name,
                cause=self.envelope,
                conversation_id=conversation_id,
                msg_id=msg_id,
            )
            envelope.llm = self._llm
            return await self.bus.publish(message, envelope=envelope)
        return await self.bus.publish(
            message, sender=self.agent.name, cause=self.envelope, conversation_id=conversation_id, msg_id=msg_id
        )

    async def publish_many(self, messages: Sequence[Any], *, conversation_id: str | None = None) -> list[Envelope]:
        """Publish several Events or Commands, in order, as one batch, caused by the message being handled.

        Each gets the id :meth:`publish` would give it, in turn. Traced, the batch is one PRODUCER
        span that every message carries (``messaging.batch.message_count``), not a span per
        message: what a handler returns as a list is sent this way.
        """
        for message in messages:
            self._check(message)
        msg_ids: list[str | None] = []
        cause_id = self.message_id if self._derive_ids else None
        for _ in messages:
            msg_ids.append(derived_id(cause_id, self.agent.name, self._published) if cause_id is not None else None)
            if self._derive_ids:
                self._published += 1
        return await self.bus.publish_many(
            messages,
            sender=self.agent.name,
            cause=self.envelope,
            conversation_id=conversation_id,
            msg_ids=msg_ids,
            llm=self._llm,
        )

    def note_llm(self, note: str) -> None:
        """Say that what this handler publishes from now on was decided with model calls (``Ba-Llm``).

        :class:`~busagents.llm.Decider` calls it; ``busagents trace`` marks such messages.
        """
        self._llm = note

    async def catch_up(self, timeout: float = 10.0) -> None:
        """Wait until the agent's views (``@on(C, view=True)``) hold every event stored before this call.

        Call it before answering from a view when the answer must not be older than the event
        stream (an event published before the question is in the answer). Nothing to wait for
        in an agent without views.
        """
        for view in self._views:
            await view.catch_up(timeout)

    async def state(self, bucket: str, type_: type[T]) -> State[T]:
        """The agent's key-value state ``bucket`` (declared in ``state_buckets``), values of ``type_``."""
        if bucket not in self.agent.state_buckets:
            raise ConfigError(
                f"agent {self.agent.name!r} may not use the state bucket {bucket!r}: "
                f"add it to {type(self.agent).__name__}.state_buckets"
            )
        return await self.bus.state(bucket, type_)

    @property
    def span(self) -> Span:
        """The OpenTelemetry span of the message being handled (a no-op span when telemetry is off)."""
        from opentelemetry import trace  # imported on first use: most agents never ask

        return trace.get_current_span()

    async def request(self, query: Any, *, timeout: float = 5.0, reply_as: type[Any] | None = None) -> Any:
        """Send a declared Query and return its typed reply (decoded into ``reply_as`` when given:
        see :meth:`busagents.Bus.request`)."""
        self._check(query)
        return await self.bus.request(
            query, timeout=timeout, sender=self.agent.name, cause=self.envelope, reply_as=reply_as
        )


def message_identity(message_id: str, data: bytes) -> str:
    """``message_id`` bound to the bytes it names (see :attr:`Context.message_id`)."""
    digest = hashlib.blake2b(data, digest_size=16).digest()
    return f"{message_id}:{base64.urlsafe_b64encode(digest)[:22].decode()}"
