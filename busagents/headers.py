"""NATS header blocks <-> dicts, on the hot paths of sending and receiving.

nats-py parses every header block line by line with a per-character whitespace
check (about 6 us a message with busagents' six envelope headers: 42% of a
receiver's time) and builds one with a regex and four copies per header (about
12 us a publish). :func:`parse_headers` and :func:`encode_headers` take a fast
path for the common case (plain names, single-line values, no inline status)
and give exactly what nats-py would; anything else is left to nats-py.

:class:`FastHeadersClient` also queues ``flush()``'s PING behind the commands still
buffered, so that a flush after a subscribe returns only once the server has the
subscription (nats-py 2.16 could send the PING first).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from nats.aio.client import Client
from nats.protocol.command import hpub_cmd

__all__ = ["FastHeadersClient", "encode_headers", "parse_headers"]

_PING = b"PING\r\n"
_PREFIX = b"NATS/1.0\r\n"
_PREFIX_LEN = len(_PREFIX)
_WS = " \t\n\r\x0b\x0c"  # what bytes.strip() strips, as nats-py does
_NAMES = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # header name characters, as nats-py checks them


def parse_headers(block: bytes) -> dict[str, str] | None:
    """The headers of a ``NATS/1.0\\r\\nName: Value\\r\\n...`` block, or None when it needs nats-py's parser.

    None for a block with an inline status (``NATS/1.0 404``), non-ASCII bytes, or
    whitespace or control characters inside a header name.
    """
    if not block.startswith(_PREFIX):
        return None
    try:
        text = block[_PREFIX_LEN:].decode("ascii")
    except UnicodeDecodeError:
        return None
    out: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip(_WS)
            if " " in key or not key.isprintable():  # nats-py drops names with whitespace inside
                return None
            out[key] = value.strip(_WS)
    return out


def encode_headers(headers: dict[str, str]) -> bytes | None:
    """The header block nats-py would send for ``headers``, or None when nats-py must build it.

    None when a name is empty or not a token, a name or value is not a plain ``str``
    (nats-py's own JetStream and KV headers are ``str`` enums, which format as
    ``Header.X``), or a value has a line break (nats-py skips, rejects or rewrites those).
    """
    if "" in headers or not _NAMES.fullmatch("".join(headers)):
        return None
    parts = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if type(name) is not str or type(value) is not str or "\n" in value or "\r" in value:
            return None
        parts.append(f"{name}: {value.strip()}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode()


class FastHeadersClient(Client):
    """A nats-py client that builds and parses plain header blocks itself, faster, and flushes in order."""

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

    async def _process_headers(self, headers: Any) -> dict[str, str] | None:
        if headers:
            parsed = parse_headers(headers)
            if parsed is not None:
                return parsed or None
        result: dict[str, str] | None = await super()._process_headers(headers)
        return result
