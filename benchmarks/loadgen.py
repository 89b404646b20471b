"""The publisher every throughput variant receives from: pre-encoded messages on a raw socket.

It speaks the NATS client protocol directly (CONNECT, HPUB, PING) and writes the
messages in large batches, so it publishes far faster than any Python receiver
consumes and finishes early: the receivers, not the publisher, set the rate. Every
variant receives the very same bytes (subject, busagents envelope headers, JSON body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Sequence

import msgspec

from busagents.contract import contract_info, subject_for
from busagents.envelope import Envelope

__all__ = ["Blaster", "encode_messages"]


def _hpub(subject: str, headers: dict[str, str], payload: bytes) -> bytes:
    head = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    hdr = head.encode()
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(hdr), len(hdr) + len(payload), hdr, payload)


def encode_messages(messages: Iterable[msgspec.Struct]) -> list[bytes]:
    """Protocol frames of contract instances, each with a fresh busagents envelope as a Bus would send."""
    frames = []
    for message in messages:
        info = contract_info(type(message))
        envelope = Envelope.new(info.name, info.version, sender="bench-publisher")
        frames.append(_hpub(subject_for(info, message), envelope.to_headers(), msgspec.json.encode(message)))
    return frames


class Blaster:
    """A minimal NATS publisher on one TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, url: str) -> Blaster:
        host, _, port = url.split("://", 1)[-1].rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
        info = await reader.readline()
        if not info.startswith(b"INFO"):
            raise ConnectionError(f"expected INFO from nats-server, got {info[:80]!r}")
        options = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True, "protocol": 1}
        writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
        blaster = cls(reader, writer)
        await blaster.flush()
        return blaster

    async def publish(self, frames: Sequence[bytes], batch: int = 2000) -> None:
        """Write ``frames`` in batches, then wait until the server has processed them all."""
        write = self._writer.write
        for start in range(0, len(frames), batch):
            write(b"".join(frames[start : start + batch]))
            await self._writer.drain()
        await self.flush()

    async def flush(self, timeout: float = 60.0) -> None:
        """PING and wait for the PONG: the server has read everything sent before."""
        self._writer.write(b"PING\r\n")
        await self._writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                line = await self._reader.readline()
                if not line:
                    raise ConnectionError("nats-server closed the publisher's connection")
                if line.startswith(b"PONG"):
                    return
                if line.startswith(b"PING"):
                    self._writer.write(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise ConnectionError(f"nats-server: {line.decode(errors='replace').strip()}")

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()
