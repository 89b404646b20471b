"""Every use of nats-py's internals, in one place: the client busagents connects with, and a few accessors.

nats-py has no public API for what these do, so they lean on private names. They are
tested against the nats-py version pinned in ``pyproject.toml`` (``tests/test_adapters.py``
checks each assumption and fails loudly when a release breaks one; ``make test-newest``
runs the suite against the newest nats-py). No other module of busagents touches a
private name of nats-py.

:class:`BusClient` changes four things about nats-py's client:

- **Fast header blocks**: plain header blocks are built and parsed by :mod:`busagents.headers`.
- **flush() in order**: the PING of a flush is queued behind the commands still buffered,
  and the PONG of a flush given up on (timed out, cancelled) no longer ends the read loop.
- **Hostile bytes never stop the read loop.** nats-py ends its read loop on an exception it
  does not expect, and the connection stays up but deaf until ping-based stale detection
  replaces it, minutes later. Here, a header block nats-py cannot parse (a status line that
  is not UTF-8, no line end) is delivered without those headers; a subject or reply subject
  that is not UTF-8 is decoded with U+FFFD for the bad bytes; a subject with a vertical tab
  or a form feed (one token to the server, several to nats-py's parser, which then
  reconnected) is read as the server meant it; anything else a message makes nats-py raise
  drops that message with a log line. The message otherwise reaches its subscriber, where
  the worker handles it or dead-letters it.
- **Outputs that would break a server limit never leave**: a message larger than the
  server's ``max_payload`` (headers included: nats-py counts only the payload) or whose
  control line exceeds 4,096 bytes (a long subject) raises
  :class:`~busagents.errors.MessageTooLargeError`, and a malformed subject
  :class:`~busagents.errors.InvalidSubjectError`, before anything is sent: the server would
  answer ``-ERR`` and close the connection, and nats-py does not reconnect after that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.command import hpub_cmd
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    CRLF_SIZE,
    ERR_RE,
    INFO_RE,
    MAX_CONTROL_LINE_SIZE,
    OK_RE,
    PING_RE,
    PONG_RE,
    Parser,
)

from .errors import InvalidSubjectError, MessageTooLargeError
from .headers import encode_headers, parse_headers, parse_headers_leniently

__all__ = [
    "MAX_CONTROL_LINE",
    "BusClient",
    "buffered",
    "heartbeat_check_died",
    "pending_queue",
    "taken",
]

log = logging.getLogger("busagents.nats")

#: The server's default ``max_control_line``: a PUB/HPUB line longer than this closes the connection.
#: The server does not announce its own setting, so a server configured lower still answers ``-ERR``.
MAX_CONTROL_LINE = 4096

_PING = b"PING\r\n"
_CRLF = b"\r\n"
_HPUB_LINE = len(b"HPUB    \r\n") + 2 * 20  # the control line besides the subjects: spaces, sizes, CRLF
_SAFE_CHARS = (MAX_CONTROL_LINE - _HPUB_LINE) // 4  # subjects this short fit whatever their UTF-8 length

# nats-py's MSG/HMSG patterns split on \s, which also matches \x0b and \x0c; the server splits
# only on space and tab, so such a subject is one token to it and several to nats-py.
_MSG_RE = re.compile(rb"\AMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)\r\n")
_HMSG_RE = re.compile(rb"\AHMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)[ \t]+(\d+)\r\n")


def _utf8(subject: bytes) -> bytes:
    """``subject`` when it is ASCII or UTF-8, else with U+FFFD for the bytes that are not."""
    if subject.isascii():
        return subject
    return subject.decode("utf-8", "replace").encode()


class _Parser(Parser):
    """nats-py's protocol parser, reading subjects as the server wrote them (see the module doc).

    ``parse`` is nats-py 2.16's, with two changes: the MSG/HMSG patterns above, and subjects
    and reply subjects made valid UTF-8 before nats-py decodes them.
    """

    async def parse(self, data: bytes = b"") -> None:
        self.buf.extend(data)
        nc: Any = self.nc
        while self.buf:
            if self.state == AWAITING_CONTROL_LINE:
                msg = _MSG_RE.match(self.buf)
                if msg:
                    try:
                        subject, sid, _, reply, needed_bytes = msg.groups()
                        self.msg_arg["subject"] = _utf8(subject)
                        self.msg_arg["sid"] = int(sid)
                        self.msg_arg["reply"] = _utf8(reply) if reply else b""
                        self.needed = int(needed_bytes)
                        del self.buf[: msg.end()]
                        self.state = AWAITING_MSG_PAYLOAD
                        continue
                    except Exception:
                        raise ProtocolError("nats: malformed MSG") from None

                msg = _HMSG_RE.match(self.buf)
                if msg:
                    try:
                        subject, sid, _, reply, header_size, needed_bytes = msg.groups()
                        self.msg_arg["subject"] = _utf8(subject)
                        self.msg_arg["sid"] = int(sid)
                        self.msg_arg["reply"] = _utf8(reply) if reply else b""
                        self.needed = int(needed_bytes)
                        self.header_needed = int(header_size)
                        del self.buf[: msg.end()]
                        self.state = AWAITING_MSG_PAYLOAD
                        continue
                    except Exception:
                        raise ProtocolError("nats: malformed MSG") from None

                ok = OK_RE.match(self.buf)
                if ok:
                    del self.buf[: ok.end()]
                    continue

                err = ERR_RE.match(self.buf)
                if err:
                    emsg = (err.groups()[0] or b"").decode("utf-8", "replace").lower()
                    await nc._process_err(emsg)
                    del self.buf[: err.end()]
                    continue

                ping = PING_RE.match(self.buf)
                if ping:
                    del self.buf[: ping.end()]
                    await nc._process_ping()
                    continue

                pong = PONG_RE.match(self.buf)
                if pong:
                    del self.buf[: pong.end()]
                    await nc._process_pong()
                    continue

                info = INFO_RE.match(self.buf)
                if info:
                    srv_info = json.loads(info.groups()[0].decode())
                    await nc._process_info(srv_info)
                    del self.buf[: info.end()]
                    continue

                if len(self.buf) < MAX_CONTROL_LINE_SIZE and _CRLF in self.buf:
                    raise ProtocolError("nats: unknown protocol")
                break  # a control line split across reads: wait for the rest

            elif self.state == AWAITING_MSG_PAYLOAD:
                if len(self.buf) < self.needed + CRLF_SIZE:
                    break  # wait for the rest of the payload
                hdr = None
                subject = self.msg_arg["subject"]
                sid = self.msg_arg["sid"]
                reply = self.msg_arg["reply"]
                if self.header_needed > 0:
                    hdr = bytes(self.buf[: self.header_needed])
                    payload = bytes(self.buf[self.header_needed : self.needed])
                    self.header_needed = 0
                else:
                    payload = bytes(self.buf[: self.needed])
                del self.buf[: self.needed + CRLF_SIZE]
                self.state = AWAITING_CONTROL_LINE
                await nc._process_msg(sid, subject, reply, payload, hdr)


class BusClient(Client):
    """The nats-py client of a :class:`~busagents.Bus` (see the module doc for what it changes)."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)

    # Sending

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, Any] | None = None
    ) -> None:
        try:
            await super().publish(subject, payload, reply, headers)
        except (MessageTooLargeError, InvalidSubjectError):
            raise
        except nats.errors.MaxPayloadError:  # the payload alone: nats-py checks it before _send_publish
            raise MessageTooLargeError(_too_large(subject, len(payload), 0, self.max_payload)) from None
        except nats.errors.BadSubjectError:
            raise InvalidSubjectError(_bad_subject(subject, reply)) from None

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float = 0.5,
        old_style: bool = False,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        try:
            return await super().request(subject, payload, timeout, old_style, headers)
        except InvalidSubjectError:
            raise
        except nats.errors.BadSubjectError:  # checked by request() before it publishes
            raise InvalidSubjectError(_bad_subject(subject, "")) from None

    async def _request_new_style(
        self, subject: str, payload: bytes, timeout: float = 1, headers: dict[str, Any] | None = None
    ) -> Msg:
        # nats-py's, without what costs on every request (each durable publish is one, every query
        # too): its token adds two random bytes to the NUID (a getrandom() call; the NUID alone is
        # unique on the connection), and asyncio.wait_for wraps the future in another one. The answer
        # still arrives through nats-py's response subscription (_request_sub_callback), by token.
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        assert self._resp_sub_prefix is not None
        token = self._nuid.next().decode()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._resp_map[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        try:
            await self.publish(subject, payload, reply=self._resp_sub_prefix.decode() + token, headers=headers)
            return await future
        finally:
            timer.cancel()
            self._resp_map.pop(token, None)

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        try:
            block = encode_headers(headers) if headers and subject else None
        except UnicodeEncodeError:
            raise InvalidSubjectError(f"a header of the message to {_show(subject)} is not valid UTF-8") from None
        if block is None:
            if headers:
                block_size = _header_block_size(headers)
                if block_size + payload_size > self._max_payload:
                    raise MessageTooLargeError(_too_large(subject, payload_size, block_size, self._max_payload))
            if len(subject) + len(reply) > _SAFE_CHARS:
                _check_control_line(subject, reply)
            try:
                await super()._send_publish(subject, reply, payload, payload_size, headers)
            except UnicodeEncodeError:
                raise InvalidSubjectError(_bad_subject(subject, reply)) from None
            return
        if len(block) + payload_size > self._max_payload:
            raise MessageTooLargeError(_too_large(subject, payload_size, len(block), self._max_payload))
        try:
            command = hpub_cmd(subject, reply, block, payload)
        except UnicodeEncodeError:
            raise InvalidSubjectError(_bad_subject(subject, reply)) from None
        if len(command) - len(block) - payload_size - CRLF_SIZE > MAX_CONTROL_LINE:
            _check_control_line(subject, reply)
        # What nats-py's _send_publish does once the command is built.
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        # nats-py 2.16 writes PING straight to the socket, ahead of the commands still in its
        # pending buffer (a SUB just made): the PONG could come back before the server saw the
        # SUB, so flush() returned before the subscription existed and messages published right
        # after were lost (about 4% of subscribe + flush + publish on one machine). Queued behind
        # them, the PONG means what flush() promises: everything before it reached the server.
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send_command(_PING)
        await self._flush_pending()

    async def _process_pong(self) -> None:
        # nats-py sets the result of the oldest flush's future, which is cancelled when that
        # flush timed out or its task was cancelled: InvalidStateError, and the read loop ended.
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    # Receiving

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        if not headers:
            return None
        parsed = parse_headers(headers) or parse_headers_leniently(headers)
        if parsed is not None:
            return parsed or None
        try:
            result: dict[str, str] | None = await super()._process_headers(headers)
        except Exception as exc:  # nats-py's read loop would end on it
            log.warning(
                "nats: a header block nats-py cannot read (%r): %r; the message is delivered without headers",
                bytes(headers[:80]),
                exc,
            )
            return None
        return result

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        try:
            await super()._process_msg(sid, subject, reply, data, headers)
        except Exception as exc:  # nats-py's read loop would end on it: the connection deaf for minutes
            log.error("nats: dropped a message on %r that nats-py could not process: %r", subject[:200], exc)


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _header_block_size(headers: dict[str, Any]) -> int:
    """The size of the header block nats-py builds for ``headers`` (NATS/1.0 line, ``Name: value`` lines, end)."""
    size = 12
    for name, value in headers.items():
        key = name.strip()
        if key:
            size += len(key.encode()) + len(value.strip().encode()) + 4
    return size


def _check_control_line(subject: str, reply: str) -> None:
    length = len(subject.encode()) + len(reply.encode()) + _HPUB_LINE
    if length > MAX_CONTROL_LINE:
        which = "subject" if len(subject) >= len(reply) else "reply subject"
        raise MessageTooLargeError(
            f"cannot publish to {_show(subject)}: the {which} makes a {length}-byte control line and the server "
            f"closes the connection over {MAX_CONTROL_LINE}; shorten the key that goes into the subject"
        )


def _too_large(subject: str, payload: int, headers: int, limit: int) -> str:
    return (
        f"cannot publish to {_show(subject)}: {payload + headers} bytes (payload {payload}, headers {headers}) "
        f"exceed the server's max_payload of {limit} bytes"
    )


def _bad_subject(subject: str, reply: str) -> str:
    which = f"reply subject {_show(reply)}" if reply and _valid(subject) else f"subject {_show(subject)}"
    return f"cannot publish: the {which} is not a valid NATS subject (empty, whitespace or not UTF-8)"


def _valid(subject: str) -> bool:
    try:
        subject.encode()
    except UnicodeEncodeError:
        return False
    return bool(subject) and not any(c in subject for c in " \t\r\n")


def _show(subject: str) -> str:
    return repr(subject) if len(subject) <= 80 else f"{subject[:60]!r}... ({len(subject)} characters)"


# Subscriptions read directly (Mailbox, DurableConsumer): no task or queue hop per message.


def pending_queue(sub: Subscription) -> asyncio.Queue[Msg]:
    """The queue nats-py puts ``sub``'s messages in (a subscription made without a callback)."""
    queue: asyncio.Queue[Msg] = sub._pending_queue
    return queue


def taken(sub: Subscription, msg: Msg) -> None:
    """Account for ``msg`` taken off :func:`pending_queue` (nats-py's slow-consumer limit counts bytes)."""
    sub._pending_size -= len(msg.data)


def buffered(sub: Subscription) -> list[Msg]:
    """The messages waiting in :func:`pending_queue`, oldest first, left in place."""
    return list(sub._pending_queue._queue)  # type: ignore[attr-defined]


async def next_pushed(psub: Any, timeout: float) -> Msg:
    """The next message of a JetStream push subscription (``psub.next_msg(timeout)``), at less cost.

    nats-py's ``next_msg`` makes a uuid (a system call), a task and a timer for every message;
    this takes a waiting message straight off the queue and waits (with a timeout) only when
    none is there. As nats-py's does, it answers the consumer's flow control once the messages
    before the request were taken. Raises ``nats.errors.TimeoutError`` after ``timeout``.
    """
    sub = psub._sub
    queue: asyncio.Queue[Msg] = sub._pending_queue
    try:
        msg = queue.get_nowait()
    except asyncio.QueueEmpty:
        if sub._conn.is_closed:
            raise nats.errors.ConnectionClosedError from None
        try:
            msg = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            raise nats.errors.TimeoutError from None
    sub._pending_size -= len(msg.data)
    queue.task_done()
    jsi = sub._jsi
    if jsi is not None:
        jsi._active = True
        if jsi._fcr and jsi.get_js_delivered() >= jsi._fciseq:
            reply, jsi._fcr = jsi._fcr, None
            await psub._conn.publish(reply)
    return msg


def stream_position(msg: Msg) -> tuple[int, int]:
    """The stream sequence of a JetStream message and the messages pending after it, read from its
    ack subject as ``msg.metadata`` does (without the timestamp, names and objects it also makes).
    Raises ``nats.errors.NotJSMessageError`` for a message that is not a JetStream delivery."""
    tokens: list[str] = msg.reply.split(".") if msg.reply else []
    if len(tokens) >= 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[5]), int(tokens[8])
        if len(tokens) >= 11:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[7]), int(tokens[10])
    raise nats.errors.NotJSMessageError


def heartbeat_check_died(psub: Any) -> bool:
    """True when nats-py's heartbeat check of an ordered push subscription ended (it gave up on it)."""
    jsi = getattr(getattr(psub, "_sub", None), "_jsi", None)  # None on a subscription being replaced
    task = getattr(jsi, "_hbtask", None)
    return bool(task is not None and task.done())
