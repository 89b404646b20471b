"""NATS header blocks <-> dicts, on the hot paths of sending and receiving.

nats-py parses every header block line by line with a per-character whitespace
check (about 6 us a message with busagents' six envelope headers: 42% of a
receiver's time) and builds one with a regex and four copies per header (about
12 us a publish). :func:`parse_headers` and :func:`encode_headers` take a fast
path for the common case (plain names, single-line values, no inline status)
and give exactly what nats-py would; anything else is left to nats-py.

The nats-py client that uses them is :class:`busagents._natspy.BusClient`.
"""

from __future__ import annotations

import re

__all__ = ["encode_headers", "parse_headers", "parse_headers_leniently"]

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


def parse_headers_leniently(block: bytes) -> dict[str, str] | None:
    """Every ``Name: value`` line of a block without an inline status, whatever its bytes; else None.

    For the blocks :func:`parse_headers` leaves to nats-py because of a name nats-py would drop
    (not ASCII, a space inside): kept here, undecodable bytes replaced, so that what the
    framework does with the message (a dead letter) can say what it left out and why.
    """
    if not block.startswith(_PREFIX):
        return None
    out: dict[str, str] = {}
    for line in block[_PREFIX_LEN:].decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        key = name.strip(_WS)
        if sep and key:
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
