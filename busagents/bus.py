"""The bus: one nats-py connection, speaking contracts.

It publishes contracts with their envelope, sends typed queries, runs a
subscription with a bounded number of concurrent handler lanes, and lets tests
await typed messages (:meth:`Bus.expect`). Durable contracts are published to
JetStream and wait for the stream's acknowledgement (see :mod:`busagents.durable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ._natspy import BusClient, pending_queue, taken
from .codec import codec_for, encode, projection_decoder
from .contract import ContractInfo, Durability, Kind, contract_info, subject_for
from .dryrun import record
from .durable import ensure_stream, stream_name
from .envelope import MSG_ID, Envelope
from .errors import ConfigError, ContractError, DecodeError, NatsUnavailableError, NoResponderError, QueryFailedError
from .server import check_nats_url
from .state import State, open_state
from .subjects import namespace_prefix, stats_subject, stream_token

if TYPE_CHECKING:
    from .telemetry import Telemetry

__all__ = ["ERROR_HEADER", "Bus", "Expectation", "Mailbox", "Received"]


#: An nkey seed file to authenticate with (``busagents swarm secure`` writes one per agent).
NKEY_SEED_FILE_ENV = "BUSAGENTS_NKEY_SEED_FILE"
#: The CA that signed the server's TLS certificate: with it, connections use TLS.
TLS_CA_ENV = "BUSAGENTS_TLS_CA"


def _identity_from_env(options: dict[str, Any]) -> None:
    """``nkeys_seed`` and ``tls`` from the environment, unless the caller gave credentials or TLS itself.

    nats-py reads the seed file when it signs the server's nonce: the seed is never kept here.
    """
    seed = os.environ.get(NKEY_SEED_FILE_ENV)
    given = ("nkeys_seed", "nkeys_seed_str", "user_credentials", "user", "token")
    if seed and not any(options.get(k) for k in given):
        if not os.path.isfile(seed):
            raise ConfigError(f"no nkey seed file at {seed} (from {NKEY_SEED_FILE_ENV} or --creds)")
        options["nkeys_seed"] = seed
    ca = os.environ.get(TLS_CA_ENV)
    if ca and options.get("tls") is None:
        try:
            options["tls"] = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use the CA certificate {ca} (from {TLS_CA_ENV} or --tls-ca): {exc}") from None


log = logging.getLogger("busagents.bus")

#: Header of a query reply that carries the responder's failure instead of a body.
ERROR_HEADER = "Ba-Error"

_DEFAULT_DURABILITY = Durability()

T = TypeVar("T")


class Received(Generic[T]):
    """A decoded message with its envelope and subject."""

    __slots__ = ("body", "envelope", "subject")

    def __init__(self, body: T, envelope: Envelope, subject: str) -> None:
        self.body = body
        self.envelope = envelope
        self.subject = subject

    def __repr__(self) -> str:
        return f"Received({self.body!r}, subject={self.subject!r})"


class Mailbox:
    """A subscription whose messages are handled by ``lanes`` concurrent tasks.

    The lanes read nats-py's pending queue directly, so a message costs no extra
    task or queue hop; at most ``lanes`` handlers run at once.
    """

    def __init__(self, sub: Subscription, handle: Callable[[Msg], Awaitable[None]], lanes: int) -> None:
        self.subscription = sub
        self._handle = handle
        self._tasks = [asyncio.create_task(self._lane(), name=f"lane:{sub.subject}:{i}") for i in range(lanes)]

    async def _lane(self) -> None:
        sub = self.subscription
        queue = pending_queue(sub)
        handle = self._handle
        while True:
            msg = await queue.get()
            taken(sub, msg)
            try:
                await handle(msg)
            except Exception:
                log.exception("unhandled error while handling a message on %s", msg.subject)
            finally:
                queue.task_done()

    @property
    def pending(self) -> int:
        return self.subscription.pending_msgs

    async def drain(self, timeout: float) -> bool:
        """Stop taking messages, finish those received, then stop the lanes. False on timeout."""
        finished = True
        try:
            await asyncio.wait_for(self.subscription.drain(), timeout)  # type: ignore[no-untyped-call]
        except TimeoutError:
            finished = False
            log.warning(
                "drain of %s timed out after %.1fs with %d message(s) unfinished",
                self.subscription.subject,
                timeout,
                self.subscription.pending_msgs,
            )
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            pass
        await self.stop()
        return finished

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


#: Seconds between reminders that a lost connection is still down.
OUTAGE_REMINDER = 30.0

_CONNECTION_ERRORS = (OSError, TimeoutError, nats.errors.StaleConnectionError, nats.errors.NoServersError)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class _PubAck(msgspec.Struct):
    """A JetStream publish acknowledgement, as far as a durable publish reads it."""

    stream: str = ""
    error: _ApiError | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAck).decode


class _Link:
    """The life of one connection, said once each: lost, back (after how long), closed for good.

    nats-py reports every failed reconnect attempt (every ``reconnect_time_wait``): those are
    DEBUG, with a WARNING reminder at most every :data:`OUTAGE_REMINDER` seconds.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: NATS | None = None
        self.closing = False  # close() was called: the disconnect that follows is no outage
        self.down_since: float | None = None
        self.reminded = 0.0
        self.attempts = 0
        self.last_error: Exception | None = None
        self.lost: str | None = None
        self.on_reconnected: list[Callable[[], Awaitable[None]]] = []
        self.on_closed: list[Callable[[], Awaitable[None]]] = []

    async def error(self, exc: Exception) -> None:
        if self.down_since is not None:
            self.attempts += 1
            self.last_error = exc
            log.debug("nats: reconnect attempt %d failed: %r", self.attempts, exc)
            now = time.monotonic()
            if now - self.reminded >= OUTAGE_REMINDER:
                self.reminded = now
                log.warning(
                    "nats: still no connection after %.0fs (%d attempts; last error: %s)",
                    now - self.down_since,
                    self.attempts,
                    _describe(exc),
                )
            return
        if isinstance(exc, _CONNECTION_ERRORS):  # the connection is going: said once, by disconnected()
            self.last_error = exc
            log.info("nats: %s", _describe(exc))
            return
        log.warning("nats: %s", exc)

    async def disconnected(self) -> None:
        if self.closing or self.down_since is not None or (self.nc is not None and self.nc.is_closed):
            return  # our close(), an outage already said, or closed for good (closed() says it)
        self.down_since = self.reminded = time.monotonic()
        self.attempts = 0
        reason = _describe(self.last_error) if self.last_error is not None else "no error given"
        log.warning("nats: lost the connection to %s (%s); reconnecting", self.url, reason)

    async def reconnected(self) -> None:
        current = self.nc.connected_url if self.nc is not None else None
        if current is not None:
            self.url = current.geturl()
        log.info("nats: reconnected to %s", self.url)
        if self.down_since is not None:
            log.warning("nats: connection back after %.1fs, to %s", time.monotonic() - self.down_since, self.url)
        self.down_since = None
        self.last_error = None
        for listener in list(self.on_reconnected):
            await listener()

    async def closed(self) -> None:
        if self.closing:
            return
        error = self.nc.last_error if self.nc is not None else None
        reason = _describe(error) if error is not None else "no error given"
        self.lost = f"the connection to {self.url} was closed ({reason}) and nats-py does not reconnect after that"
        log.error("nats: %s; nothing more is sent or received on it", self.lost)
        for listener in list(self.on_closed):
            await listener()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Bus:
    """A NATS connection that publishes and receives contracts.

    ``replicas``, ``ack_wait``, ``max_deliver`` and ``backoff``, when given, override every
    durable contract's declaration (deployment choices: R3 on a 3-node cluster, short waits
    in fault tests).
    """

    def __init__(
        self,
        nc: NATS,
        *,
        replicas: int | None = None,
        ack_wait: float | None = None,
        max_deliver: int | None = None,
        backoff: tuple[float, ...] | None = None,
        publish_timeout: float = 30.0,
        telemetry: Telemetry | None = None,
        prefix: str = "",
        dry_run: bool = False,
    ) -> None:
        self.nc = nc
        #: Record what its agents send instead of sending it (:mod:`busagents.dryrun`).
        self.dry_run = dry_run
        #: Subject namespace (``replay.c1.``): prepended to every contract subject, stream and bucket
        #: this bus uses, so agents can run on recorded input beside production (:mod:`busagents.subjects`).
        self.prefix = namespace_prefix(prefix)
        self._token = stream_token(self.prefix)
        #: OpenTelemetry spans and metrics for every publish and handled message (None: off, no cost).
        self.telemetry = telemetry
        self.js = nc.jetstream(timeout=5.0)
        self.replicas = replicas
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.backoff = backoff
        #: Seconds a durable publish keeps retrying (same message id) before it fails.
        self.publish_timeout = publish_timeout
        self._durability: dict[Durability, Durability] = {}
        self._link = _Link("")
        self._states: dict[tuple[str, Any], State[Any]] = {}
        self._streams: set[str] = set()  # durable contracts whose stream this bus made sure of

    @classmethod
    async def connect(
        cls,
        url: str = "nats://127.0.0.1:4222",
        *,
        name: str = "busagents",
        connect_timeout: float = 2.0,
        telemetry: Telemetry | None = None,
        replicas: int | None = None,
        ack_wait: float | None = None,
        max_deliver: int | None = None,
        backoff: tuple[float, ...] | None = None,
        prefix: str = "",
        dry_run: bool = False,
        **options: Any,
    ) -> Bus:
        """Connect to NATS; nats-py reconnects after a network failure or a server restart.

        ``url`` may list several servers separated by commas (a cluster). An outage is logged
        once when it starts and once when it ends; a connection closed for good sets :attr:`lost`.
        Without ``telemetry``, the standard ``OTEL_*`` variables decide whether it traces
        (:func:`busagents.telemetry.configure_from_env`): every agent run on it exports.
        """
        link = _Link(url)
        options.setdefault("error_cb", link.error)
        options.setdefault("disconnected_cb", link.disconnected)
        options.setdefault("reconnected_cb", link.reconnected)
        options.setdefault("closed_cb", link.closed)
        options.setdefault("max_reconnect_attempts", -1)
        options.setdefault("reconnect_time_wait", 0.5)
        _identity_from_env(options)
        servers = check_nats_url(url)
        try:
            nc = BusClient()
            await nc.connect(
                servers, **{"name": name, "connect_timeout": connect_timeout, "allow_reconnect": True, **options}
            )
        except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
            raise NatsUnavailableError(
                f"cannot reach NATS at {url} ({exc.__class__.__name__}: {exc}); "
                "start a nats-server there, pass another --nats URL, or let busagents start an embedded one"
            ) from None
        link.nc = nc
        if telemetry is None:  # the standard OTEL_* variables decide (None when they ask for nothing)
            from .telemetry import configure_from_env

            telemetry = configure_from_env(service_name=name)
        current = nc.connected_url
        link.url = current.geturl() if current is not None else url
        bus = cls(
            nc,
            replicas=replicas,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            backoff=backoff,
            telemetry=telemetry,
            prefix=prefix,
            dry_run=dry_run,
        )
        bus._link = link
        return bus

    def on_reconnected(self, listener: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Call ``listener`` after each reconnect (connections made by :meth:`connect`); returns a remover."""
        self._link.on_reconnected.append(listener)
        return lambda: self._link.on_reconnected.remove(listener)

    def on_closed(self, listener: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Call ``listener`` when the connection is closed for good without :meth:`close` (see :attr:`lost`)."""
        self._link.on_closed.append(listener)
        return lambda: self._link.on_closed.remove(listener)

    @property
    def lost(self) -> str | None:
        """Why the connection was closed for good without :meth:`close`, or None.

        nats-py reconnects after a network failure or a server restart, but not after the
        server answered ``-ERR`` (a limit broken, a parse error): the connection then stays
        closed while the process runs on. ``busagents run`` exits when this is set.
        """
        return self._link.lost

    async def state(self, bucket: str, type_: type[T]) -> State[T]:
        """The JetStream key-value bucket ``bucket`` with values of ``type_`` (created on first use).

        See :mod:`busagents.state`; in a handler, use :meth:`Context.state` (it checks the
        agent declared the bucket).
        """
        state = self._states.get((bucket, type_))
        if state is None:
            state = self._states[(bucket, type_)] = await open_state(
                self.js,
                ("dryrun_" if self.dry_run else "") + self._token + bucket,
                type_,
                replicas=self.replicas or 1,
                nc=self.nc,
            )
        return state

    def durability(self, info: ContractInfo, declared: Durability | None = None) -> Durability:
        """The effective durability of a contract (or of one subscription's ``declared`` one)."""
        d = declared or info.durability or _DEFAULT_DURABILITY
        effective = self._durability.get(d)
        if effective is None:
            changes: dict[str, Any] = {}
            if self.replicas is not None:
                changes["replicas"] = self.replicas
            if self.ack_wait is not None:
                changes["ack_wait"] = self.ack_wait
            if self.max_deliver is not None:
                changes["max_deliver"] = self.max_deliver
            if self.backoff is not None:
                changes["backoff"] = tuple(self.backoff)
            effective = self._durability[d] = dataclasses.replace(d, **changes) if changes else d
        return effective

    async def ensure_stream(self, contract: type[Any] | ContractInfo, declared: Durability | None = None) -> str:
        """Create or update the JetStream stream of a durable contract; returns its name."""
        info = contract if isinstance(contract, ContractInfo) else contract_info(contract)
        d = self.durability(info, declared)
        if self.prefix:
            d = dataclasses.replace(d, stream=self._token + stream_name(info, d))
            info = self.namespaced(info)
        return await ensure_stream(self.js, info, d)

    def namespaced(self, info: ContractInfo) -> ContractInfo:
        """The contract as this bus sees it: its subject under :attr:`prefix` (itself without one)."""
        if not self.prefix:
            return info
        return dataclasses.replace(info, subject=self.prefix + info.subject)

    def subject(self, subject: str) -> str:
        """``subject`` under this bus's :attr:`prefix`."""
        return self.prefix + subject

    def stream_name(self, name: str) -> str:
        """A stream's name in this bus's namespace."""
        return self._token + name

    @property
    def url(self) -> str:
        current = self.nc.connected_url
        return current.geturl() if current is not None else ""

    async def publish(
        self,
        message: Any,
        *,
        sender: str | None = None,
        cause: Envelope | None = None,
        conversation_id: str | None = None,
        envelope: Envelope | None = None,
        msg_id: str | None = None,
    ) -> Envelope:
        """Publish a contract instance; returns the envelope it travelled with.

        A durable contract is stored in its stream before this returns (JetStream publish
        ack), and a publish repeated with the same ``msg_id`` is stored once.
        """
        info = contract_info(type(message))
        if info.kind is Kind.QUERY:
            raise ContractError(f"{info.name} is a query: send it with request(), not publish()")
        if envelope is None:
            envelope = Envelope.new(
                info.name, info.version, sender=sender, cause=cause, conversation_id=conversation_id, msg_id=msg_id
            )
        subject = subject_for(info, message)
        if self.prefix:
            subject = self.prefix + subject
        telemetry = self.telemetry
        if telemetry is not None:  # its span, without a context manager's cost on every publish
            span = telemetry.start_publish(subject, info.subscribe_subject, envelope)
            if span is not None:
                try:
                    await self._send(info, subject, encode(message), envelope.to_headers())
                except BaseException as exc:
                    telemetry.failed(span, exc)
                    raise
                finally:
                    span.end()
                return envelope
        await self._send(info, subject, encode(message), envelope.to_headers())
        return envelope

    async def publish_many(
        self,
        messages: Sequence[Any],
        *,
        sender: str | None = None,
        cause: Envelope | None = None,
        conversation_id: str | None = None,
        msg_ids: Sequence[str | None] | None = None,
        llm: str | None = None,
    ) -> list[Envelope]:
        """Publish contract instances in order, as one batch; their envelopes.

        Each message is sent as :meth:`publish` sends it (a durable one stored before the next is
        sent), with the id at its place in ``msg_ids``. Traced, a batch of one conversation (a
        ``cause`` or a ``conversation_id`` given) is one PRODUCER span whose context every message
        carries (``messaging.batch.message_count``), not a span per message; messages that start
        conversations of their own get a span each (one trace per conversation).
        ``llm``: the ``Ba-Llm`` note of every envelope.
        """
        if msg_ids is not None and len(msg_ids) != len(messages):
            raise ValueError(f"{len(messages)} messages but {len(msg_ids)} message ids")
        sends: list[tuple[ContractInfo, Any, str, Envelope]] = []
        for i, message in enumerate(messages):
            info = contract_info(type(message))
            if info.kind is Kind.QUERY:
                raise ContractError(f"{info.name} is a query: send it with request(), not publish()")
            envelope = Envelope.new(
                info.name,
                info.version,
                sender=sender,
                cause=cause,
                conversation_id=conversation_id,
                msg_id=msg_ids[i] if msg_ids is not None else None,
            )
            if llm is not None:
                envelope.llm = llm
            sends.append((info, message, self.prefix + subject_for(info, message), envelope))
        telemetry = self.telemetry
        if telemetry is None or len(sends) < 2 or len({e.conversation_id for _, _, _, e in sends}) > 1:
            # a span per message: one trace per conversation, and these start several
            return [await self.publish(message, envelope=envelope) for _, message, _, envelope in sends]
        span = telemetry.start_batch([(subject, info.subscribe_subject, e) for info, _, subject, e in sends])
        try:
            for info, message, subject, envelope in sends:
                await self._send(info, subject, encode(message), envelope.to_headers())
        except BaseException as exc:
            if span is not None:
                telemetry.failed(span, exc)
            raise
        finally:
            if span is not None:
                span.end()
        return [envelope for _, _, _, envelope in sends]

    async def _send(self, info: ContractInfo, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        if self.dry_run:
            await record(self, subject, payload, headers)
        elif info.durable:
            await self.publish_durable(info, subject, payload, headers)
        else:
            await self.nc.publish(subject, payload, headers=headers)

    async def publish_durable(self, info: ContractInfo, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Store one message in the contract's stream, retrying with the same id until acknowledged.

        Creates the stream on first use. Retries cover a server restart or a cluster leader
        election; the ``Nats-Msg-Id`` header makes every retry land at most once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        ensured = False
        if info.name not in self._streams:
            # Before the first publish: with no stream, a core subscriber on the subject (an agent that
            # consumes it on core NATS, a test's expect) gets the message and nobody answers the publish.
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.ensure_stream(info)
                self._streams.add(info.name)
                ensured = True
        delay = 0.05
        while True:
            try:
                await self._store(subject, payload, headers)
                return
            except nats.js.errors.NoStreamResponseError:
                if not ensured and self.nc.is_connected:
                    with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                        await self.ensure_stream(info)
                        ensured = True
                        continue
                error: Exception = QueryFailedError(f"no JetStream stream stores {subject}")
            except (nats.errors.TimeoutError, nats.errors.ConnectionReconnectingError) as exc:
                error = exc
            except nats.js.errors.ServiceUnavailableError as exc:
                error = exc
            except nats.js.errors.APIError as exc:
                if exc.code is None or exc.code < 500:
                    raise ContractError(f"JetStream refused {info.name} on {subject}: {exc.description}") from None
                error = exc
            if loop.time() + delay > deadline:
                raise NatsUnavailableError(
                    f"could not store {info.name} (id {headers.get(MSG_ID)}) on {subject} within "
                    f"{self.publish_timeout}s: {error!r}"
                )
            await asyncio.sleep(delay)  # back off while the server or the stream leader comes back
            delay = min(delay * 2, 1.0)

    async def _store(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """One JetStream publish: what ``js.publish`` does, its acknowledgement decoded by msgspec (a
        durable publish is on every hop of a swarm: nats-py's stdlib JSON and dataclass cost more)."""
        try:
            msg = await self.nc.request(subject, payload, timeout=2.0, headers=headers)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        try:
            ack = _decode_pub_ack(msg.data)
        except msgspec.DecodeError:
            ack = _PubAck()
        if ack.error is not None:
            nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))
        if not ack.stream:  # something else answered on the subject: not retried, it would answer again
            raise nats.js.errors.APIError(code=400, description=f"not a JetStream acknowledgement: {msg.data[:200]!r}")

    async def request(
        self,
        query: Any,
        *,
        timeout: float = 5.0,
        sender: str | None = None,
        cause: Envelope | None = None,
        conversation_id: str | None = None,
        reply_as: type[Any] | None = None,
    ) -> Any:
        """Send a query and return its typed reply; raises QueryFailedError when it fails.

        ``reply_as`` decodes the reply into another msgspec type shaped like the declared reply, or
        like the part of it the caller reads: fields it does not name are skipped, and a
        ``msgspec.Raw`` field keeps its JSON undecoded (to decode later, or once for many replies).
        """
        info = contract_info(type(query))
        if info.kind is not Kind.QUERY or info.reply is None:
            raise ContractError(f"{info.name} is a {info.kind.value}, not a query: publish() it instead")
        decode = codec_for(info.reply).decode if reply_as is None else projection_decoder(info.reply, reply_as)
        envelope = Envelope.new(info.name, info.version, sender=sender, cause=cause, conversation_id=conversation_id)
        subject = subject_for(info, query)
        if self.prefix:
            subject = self.prefix + subject
        if self.telemetry is not None:
            with self.telemetry.publish_span(subject, info.subscribe_subject, envelope, request=True):
                return await self._request(info, subject, query, envelope, timeout, decode)
        return await self._request(info, subject, query, envelope, timeout, decode)

    async def _request(
        self,
        info: ContractInfo,
        subject: str,
        query: Any,
        envelope: Envelope,
        timeout: float,
        decode: Callable[[bytes], Any],
    ) -> Any:
        try:
            msg = await self.nc.request(subject, encode(query), timeout=timeout, headers=envelope.to_headers())
        except nats.errors.NoRespondersError:
            raise NoResponderError(f"{info.name}: no agent answers on {subject}") from None
        except nats.errors.TimeoutError:
            raise QueryFailedError(f"{info.name}: no reply on {subject} within {timeout}s") from None
        headers = msg.headers
        if headers and ERROR_HEADER in headers:
            raise QueryFailedError(f"{info.name}: the answering agent failed: {headers[ERROR_HEADER]}")
        try:
            return decode(msg.data)
        except DecodeError as exc:
            raise QueryFailedError(f"{info.name}: invalid reply: {exc}") from None

    async def mailbox(
        self,
        subject: str,
        handle: Callable[[Msg], Awaitable[None]],
        *,
        queue: str = "",
        lanes: int = 1,
        pending_msgs_limit: int = 512 * 1024,
        pending_bytes_limit: int = 256 * 1024 * 1024,
    ) -> Mailbox:
        """Subscribe ``subject`` (in queue group ``queue``) and handle with ``lanes`` concurrent tasks."""
        sub = await self.nc.subscribe(
            subject,
            queue=queue,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )
        return Mailbox(sub, handle, lanes)

    def expect(
        self,
        contract: type[T],
        *,
        where: Callable[[T], bool] | None = None,
        timeout: float = 5.0,
        count: int = 1,
        subject: str | None = None,
    ) -> Expectation[T]:
        """Wait for ``count`` messages of ``contract`` matching ``where``.

        ``await bus.expect(C)`` subscribes and waits. To be sure not to miss a
        message caused by your own action, subscribe first::

            async with bus.expect(BookingChanged, where=lambda m: m.booking_id == "B1") as got:
                await bus.publish(RebookPassenger(...))
            print(got.message.body)
        """
        return Expectation(self, contract, where=where, timeout=timeout, count=count, subject=subject)

    async def wait_for_agents(self, names: Iterable[str], *, timeout: float = 30.0) -> None:
        """Wait until every named agent type has at least one replica serving.

        Serving is seen from the stats heartbeats (``busagents.stats.<agent>``, sent when a
        worker has subscribed, then every ``BUSAGENTS_HEARTBEAT_INTERVAL`` seconds). Use it
        before feeding a swarm from outside, so that no core-NATS event is published before
        its consumers listen. Raises TimeoutError naming the agents not seen.
        """
        missing = set(names)
        if not missing:
            return
        done = asyncio.get_running_loop().create_future()

        async def on_beat(msg: Msg) -> None:
            missing.discard(msg.subject.rsplit(".", 1)[-1])
            if not missing and not done.done():
                done.set_result(None)

        # one subscription per agent type: a connection allowed to read only those heartbeats can wait
        subs = [await self.nc.subscribe(stats_subject(name), cb=on_beat) for name in sorted(missing)]
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no heartbeat within {timeout}s from: {', '.join(sorted(missing))} "
                "(are they running, with BUSAGENTS_HEARTBEAT_INTERVAL > 0?)"
            ) from None
        finally:
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def flush(self, timeout: float = 5.0) -> None:
        await self.nc.flush(timeout=int(max(1, timeout)))

    async def close(self) -> None:
        """Flush what was published, then close."""
        self._link.closing = True
        if self.nc.is_closed:
            return
        with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError, TimeoutError):
            await self.nc.flush(timeout=5)
        await self.nc.close()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Expectation(Generic[T]):
    """Messages awaited by :meth:`Bus.expect`: usable with ``await`` or ``async with``."""

    def __init__(
        self,
        bus: Bus,
        contract: type[T],
        *,
        where: Callable[[T], bool] | None,
        timeout: float,
        count: int,
        subject: str | None,
    ) -> None:
        self._bus = bus
        self._info = contract_info(contract)
        self._where = where
        self._timeout = timeout
        self._count = count
        self._subject = bus.prefix + (subject or self._info.subscribe_subject)
        self._sub: Subscription | None = None
        self._done: asyncio.Future[None] | None = None
        self.messages: list[Received[T]] = []
        self.rejected: list[tuple[bytes, str]] = []

    @property
    def message(self) -> Received[T]:
        """The first matching message."""
        if not self.messages:
            raise AssertionError(f"no {self._info.name} received")
        return self.messages[0]

    async def start(self) -> None:
        decode = codec_for(self._info.cls).decode
        self._done = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            try:
                body = decode(msg.data)
            except DecodeError as exc:
                self.rejected.append((msg.data, str(exc)))
                return
            if self._where is not None and not self._where(body):
                return
            self.messages.append(
                Received(body, Envelope.from_headers(msg.headers, contract=self._info.name), msg.subject)
            )
            if len(self.messages) >= self._count and self._done is not None and not self._done.done():
                self._done.set_result(None)

        self._sub = await self._bus.nc.subscribe(self._subject, cb=on_msg)
        await self._bus.nc.flush()

    async def wait(self) -> list[Received[T]]:
        assert self._done is not None, "start() first"
        try:
            await asyncio.wait_for(asyncio.shield(self._done), self._timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected {self._count} {self._info.name} on {self._subject} within {self._timeout}s, "
                f"got {len(self.messages)}" + (f"; rejected {len(self.rejected)} undecodable" if self.rejected else "")
            ) from None
        finally:
            await self._stop()
        return self.messages

    async def _stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def __aenter__(self) -> Expectation[T]:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.wait()
        else:
            await self._stop()

    def __await__(self) -> Generator[Any, None, Received[T]]:
        async def run() -> Received[T]:
            await self.start()
            await self.wait()
            return self.messages[0]

        return run().__await__()
