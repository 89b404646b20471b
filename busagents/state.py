"""Agent state in JetStream key-value buckets, typed.

An agent declares the buckets it keeps state in, and opens them from its context::

    class Monitor(Agent):
        state_buckets = ("flights",)

        @on(FlightStatus)
        async def status(self, msg: FlightStatus, ctx: Context) -> FlightDelayed | None:
            flights = await ctx.state("flights", FlightState)
            seen = await flights.entry(msg.flight_id)
            ...
            await flights.update(msg.flight_id, new, revision=seen.revision)  # or put()

State lives in the NATS server, not in the process: a restarted or rescheduled replica
finds it there, and the replicas of an agent share it. Writes are last-writer-wins with
:meth:`State.put`; :meth:`State.create` and :meth:`State.update` are compare-and-set on
the key's revision and raise :class:`StateConflictError` when another writer got there
first (read again, decide again, write again). Values are JSON: msgspec for Structs and
plain types, pydantic for ``BaseModel``\\ s. A bucket is created on first use (file
storage, one value per key kept) and shared with any process that opens it by name.
"""

from __future__ import annotations

import base64
import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import nats.errors
import nats.js.api
import nats.js.errors
import pydantic

from .errors import BusagentsError, ConfigError, DecodeError

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["State", "StateConflictError", "StateEntry", "StateWatch", "bucket_keys", "open_state", "state_permissions"]

T = TypeVar("T")

_BUCKET = re.compile(r"^[a-zA-Z0-9_-]+$")
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _StoredMsg(msgspec.Struct):
    seq: int = 0
    hdrs: str | None = None
    data: str | None = None


class _GetReply(msgspec.Struct):
    message: _StoredMsg | None = None
    error: _ApiError | None = None


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: _ApiError | None = None


_decode_get = msgspec.json.Decoder(_GetReply).decode
_decode_ack = msgspec.json.Decoder(_PubAck).decode
_DELETED = re.compile(rb"KV-Operation:\s*(DEL|PURGE)")
_WRONG_LAST_SEQUENCE = 10071


class StateConflictError(BusagentsError):
    """A compare-and-set write lost: the key was created or changed by another writer meanwhile."""


@dataclass(frozen=True, slots=True)
class StateEntry(Generic[T]):
    """A value with the revision to pass to :meth:`State.update`."""

    key: str
    value: T
    revision: int


class State(Generic[T]):
    """One JetStream key-value bucket whose values are of one type."""

    __slots__ = ("_decode", "_encode", "_get", "_kv", "_nc", "bucket", "type")

    def __init__(self, kv: KeyValue, bucket: str, type_: type[T], nc: Any = None) -> None:
        self._kv = kv
        self._nc = nc  # the connection, for the lean read and write paths below (None: nats-py's KV only)
        self._get = f"$JS.API.STREAM.MSG.GET.KV_{bucket}"
        self.bucket = bucket
        self.type = type_
        if isinstance(type_, type) and issubclass(type_, pydantic.BaseModel):
            adapter = pydantic.TypeAdapter(type_)
            self._encode: Any = adapter.dump_json
            self._decode: Any = adapter.validate_json
        else:
            self._encode = msgspec.json.Encoder().encode
            self._decode = msgspec.json.Decoder(type_).decode

    def _key(self, key: str) -> str:
        if not _KEY.match(key) or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ConfigError(
                f"invalid key {key!r} for state bucket {self.bucket!r}: letters, digits and - / _ = . "
                "(dots separate tokens: none at either end, never two in a row)"
            )
        return key

    def _value(self, key: str, data: bytes | None) -> T:
        try:
            value: T = self._decode(data or b"")
        except (msgspec.DecodeError, msgspec.ValidationError, pydantic.ValidationError) as exc:
            raise DecodeError(f"state {self.bucket}/{key} is not a valid {self.type.__name__}: {exc}") from None
        return value

    async def entry(self, key: str) -> StateEntry[T] | None:
        """The value of ``key`` with its revision, or None when there is none (or it was deleted)."""
        if self._nc is None:
            try:
                found = await self._kv.get(self._key(key))
            except nats.js.errors.KeyNotFoundError:  # KeyDeletedError is a subclass
                return None
            return StateEntry(key, self._value(key, found.value), found.revision or 0)
        # The stream leader's "last message of the subject" (read-after-write, also in a cluster),
        # decoded with msgspec: nats-py's KV get spends most of its time in json, base64 and an
        # e-mail header parser, for a call a stateful agent makes on every message.
        request = b'{"last_by_subj":"$KV.%s.%s"}' % (self.bucket.encode(), self._key(key).encode())
        reply = _decode_get((await self._nc.request(self._get, request, timeout=5.0)).data)
        if reply.error is not None:
            if reply.error.code == 404:
                return None
            raise nats.js.errors.APIError(code=reply.error.code, description=reply.error.description)
        message = reply.message
        if message is None:
            return None
        if message.hdrs and _DELETED.search(base64.b64decode(message.hdrs)):
            return None
        data = base64.b64decode(message.data) if message.data else b""
        return StateEntry(key, self._value(key, data), message.seq)

    async def get(self, key: str) -> T | None:
        """The value of ``key``, or None."""
        found = await self.entry(key)
        return found.value if found is not None else None

    async def put(self, key: str, value: T) -> int:
        """Write ``value`` whatever is there (last writer wins); returns the new revision."""
        return int(await self._kv.put(self._key(key), self._encode(value)))

    async def create(self, key: str, value: T) -> int:
        """Write ``value`` only if ``key`` has none; raises :class:`StateConflictError` otherwise."""
        data = self._encode(value)
        if self._nc is not None:
            # One round trip for a key never written (the common case): a write expecting no message on
            # the subject. A key that was deleted has a marker there; nats-py's create below handles it.
            seq = await self._write_at(key, data, 0)
            if seq is not None:
                return seq
        try:
            return int(await self._kv.create(self._key(key), data))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise StateConflictError(f"state {self.bucket}/{key} exists already") from None

    async def update(self, key: str, value: T, *, revision: int) -> int:
        """Write ``value`` only if ``key`` is still at ``revision``; raises :class:`StateConflictError`."""
        if self._nc is None:
            try:
                return int(await self._kv.update(self._key(key), self._encode(value), last=revision))
            except nats.js.errors.KeyWrongLastSequenceError:
                raise StateConflictError(f"state {self.bucket}/{key} changed since revision {revision}") from None
        seq = await self._write_at(key, self._encode(value), revision)
        if seq is None:
            raise StateConflictError(f"state {self.bucket}/{key} changed since revision {revision}")
        return seq

    async def _write_at(self, key: str, data: bytes, revision: int) -> int | None:
        """Write ``data`` if ``key``'s last revision is ``revision`` (0: none); the new revision, or None."""
        assert self._nc is not None
        msg = await self._nc.request(
            f"$KV.{self.bucket}.{self._key(key)}",
            data,
            timeout=5.0,
            headers={"Nats-Expected-Last-Subject-Sequence": str(revision)},
        )
        ack = _decode_ack(msg.data)
        if ack.error is None:
            return ack.seq
        if ack.error.err_code == _WRONG_LAST_SEQUENCE:
            return None
        raise nats.js.errors.APIError(code=ack.error.code, description=ack.error.description)

    async def delete(self, key: str) -> None:
        """Remove ``key`` (a no-op when it has no value)."""
        await self._kv.delete(self._key(key))

    def watch(self, key: str = ">") -> StateWatch[T]:
        """The current value of each key matching ``key`` (``*`` and ``>`` wildcards), then every new one.

        ``async with state.watch("BA117") as changes: async for entry in changes: ...``;
        deletions are not reported. Leaving the ``async with`` block stops the watch.
        """
        tokens = key.split(".")
        if not all(t in ("*", ">") or _KEY.match(t) for t in tokens) or ">" in tokens[:-1]:
            raise ConfigError(f"invalid key pattern {key!r} for state bucket {self.bucket!r}")
        return StateWatch(self, key)

    async def keys(self) -> list[str]:
        """Every key with a value, sorted (see :func:`bucket_keys`)."""
        return await bucket_keys(self._kv)


async def bucket_keys(kv: KeyValue) -> list[str]:
    """Every key of the key-value bucket ``kv`` with a value, sorted.

    Read with a consumer of its own (the last message of each key, headers only), as many
    messages as the consumer had to deliver when it was made. nats-py's ``KeyValue.keys()``
    asks how many are left only after its consumer exists; when the server had sent them all
    but its subscription had not taken one yet, it ended the listing before the first key:
    an empty list, in about 1 listing of 100 of a 4-key bucket on an idle 2-core machine.
    """
    js, prefix = kv._js, kv._pre
    nc = js._nc
    sub = await nc.subscribe(nc.new_inbox())
    name: str | None = None
    try:
        info = await js.add_consumer(
            kv._stream,
            deliver_subject=sub.subject,
            deliver_policy=nats.js.api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=nats.js.api.AckPolicy.NONE,
            headers_only=True,
            filter_subject=f"{prefix}>",
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=60.0,  # the server removes it should this process die before deleting it
        )
        name = info.name
        # what was left to deliver plus what went out before the answer: every key's last message
        sent = info.delivered.consumer_seq if info.delivered is not None else 0
        total = int(info.num_pending or 0) + int(sent or 0)
        keys: list[str] = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=10.0)
            if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                keys.append(msg.subject[len(prefix) :])
        return sorted(keys)
    finally:
        await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await js.delete_consumer(kv._stream, name)


def state_permissions(bucket: str) -> tuple[set[str], set[str]]:
    """NATS (publish, subscribe) permissions to open, read, write and list the keys of ``bucket``.

    Replies, values and watched keys arrive on the connection's inbox: subscribe it too.
    """
    stream = f"KV_{bucket}"
    pub = {
        f"$KV.{bucket}.>",  # put, create, update, delete
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",  # keys(): an ordered consumer
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    }
    return pub, set()


class StateWatch(Generic[T]):
    """New values of a bucket's keys as they are written: an async iterator and context manager."""

    def __init__(self, state: State[T], key: str) -> None:
        self._state = state
        self._key = key
        self._watcher: Any = None

    async def __aenter__(self) -> StateWatch[T]:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> StateWatch[T]:
        return self

    async def _start(self) -> Any:
        if self._watcher is None:
            self._watcher = await self._state._kv.watch(self._key, ignore_deletes=True)
        return self._watcher

    async def __anext__(self) -> StateEntry[T]:
        watcher = await self._start()
        async for entry in watcher:
            if entry is not None and entry.value is not None:  # None: the end of the current values
                return StateEntry(entry.key, self._state._value(entry.key, entry.value), entry.revision or 0)
        raise StopAsyncIteration

    async def stop(self) -> None:
        """Stop watching (the iteration ends)."""
        if self._watcher is not None:
            await self._watcher.stop()


async def open_state(
    js: JetStreamContext, bucket: str, type_: type[T], *, replicas: int = 1, nc: Any = None
) -> State[T]:
    """Open the bucket, creating it (file storage, history 1) when it does not exist yet."""
    if not _BUCKET.match(bucket):
        raise ConfigError(f"invalid state bucket name {bucket!r}: letters, digits, '_' or '-'")
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        # One replica: reads go straight to the server that holds it ("direct get": no API request,
        # no audit advisory, the entry's bytes as they are). With more, a direct get may be answered
        # by a follower behind the leader, so those read through the leader.
        config = nats.js.api.KeyValueConfig(
            bucket=bucket, history=1, storage=nats.js.api.StorageType.FILE, replicas=replicas, direct=replicas == 1
        )
        kv = await js.create_key_value(config)
    return State(kv, bucket, type_, nc)
