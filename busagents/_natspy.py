"""Every use of nats-py's internals, in one place: the client busagents connects with, and a few accessors.

nats-py has no public API for what these do, so they lean on private names. They are
tested against the nats-py version pinned in ``pyproject.toml`` (``tests/test_adapters.py``
checks each assumption and fails loudly when a release breaks one; ``make test-newest``
runs the suite against the newest nats-py). No other module of busagents touches a
private name of nats-py.

:class:`BusClient` changes two things about nats-py's client:

- **Fast header blocks**: plain header blocks are built and parsed by :mod:`busagents.headers`.
- **flush() in order**: the PING of a flush is queued behind the commands still buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.command import hpub_cmd

from .headers import encode_headers, parse_headers

__all__ = [
    "BusClient",
    "buffered",
    "heartbeat_check_died",
    "pending_queue",
    "taken",
]

_PING = b"PING\r\n"


class BusClient(Client):
    """The nats-py client of a :class:`~busagents.Bus` (see the module doc for what it changes)."""

    # Sending

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        block = encode_headers(headers) if headers and subject else None
        if block is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        # What nats-py's _send_publish does once the header block is built.
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(hpub_cmd(subject, reply, block, payload))
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

    # Receiving

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        if headers:
            parsed = parse_headers(headers)
            if parsed is not None:
                return parsed or None
        result: dict[str, str] | None = await super()._process_headers(headers)
        return result


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


def heartbeat_check_died(psub: Any) -> bool:
    """True when nats-py's heartbeat check of an ordered push subscription ended (it gave up on it)."""
    jsi = getattr(getattr(psub, "_sub", None), "_jsi", None)  # None on a subscription being replaced
    task = getattr(jsi, "_hbtask", None)
    return bool(task is not None and task.done())
