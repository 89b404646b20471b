"""The fast header parser gives exactly what nats-py's own parser gives, or steps aside."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from busagents import Bus
from busagents.headers import FastHeadersClient, parse_headers
from busagents.server import NatsServer

PLAIN_BLOCKS = [
    b"NATS/1.0\r\nNats-Msg-Id: abc\r\nBa-Contract: FlightDelayed\r\nBa-Version: 2\r\n\r\n",
    b"NATS/1.0\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"NATS/1.0\r\nWith-Colon: a:b:c\r\nSpaced :   padded value  \r\nEmpty:\r\nNoSpace:x\r\n\r\n",
    b"NATS/1.0\r\nDup: first\r\nDup: second\r\n\r\n",
    b"NATS/1.0\r\n\r\n",
]
ODD_BLOCKS = [
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 404 No Messages\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1016\r\n\r\n",
    "NATS/1.0\r\nCity: Zürich\r\n\r\n".encode(),
    b"NATS/1.0\r\nBad Name: dropped\r\nGood: kept\r\n\r\n",
    b"NATS/1.0\r\nTab\tName: dropped\r\nGood: kept\r\n\r\n",
    b"NATS/1.0\r\nLeading: \x1cvalue\r\n\r\n",
]


async def _stock(block: bytes) -> dict[str, str] | None:
    result: dict[str, str] | None = await Client()._process_headers(block)
    return result


@pytest.mark.parametrize("block", PLAIN_BLOCKS)
async def test_plain_header_blocks_parse_as_nats_py_parses_them(block: bytes) -> None:
    parsed = parse_headers(block)
    assert parsed is not None
    assert (parsed or None) == await _stock(block)


@pytest.mark.parametrize("block", ODD_BLOCKS[:6])
def test_status_lines_non_ascii_and_bad_names_are_left_to_nats_py(block: bytes) -> None:
    assert parse_headers(block) is None


@pytest.mark.parametrize("block", PLAIN_BLOCKS + ODD_BLOCKS)
async def test_fast_client_returns_what_the_stock_client_returns(block: bytes) -> None:
    assert await FastHeadersClient()._process_headers(block) == await _stock(block)


async def test_a_bus_receives_the_headers_a_plain_nats_py_client_receives(nats_server: NatsServer) -> None:
    sender = await nats.connect(nats_server.url)
    bus = await Bus.connect(nats_server.url)
    plain = await nats.connect(nats_server.url)
    try:
        assert isinstance(bus.nc, FastHeadersClient)
        got: dict[str, asyncio.Queue[dict[str, str] | None]] = {"bus": asyncio.Queue(), "plain": asyncio.Queue()}

        async def on_bus(msg: Msg) -> None:
            await got["bus"].put(msg.headers)

        async def on_plain(msg: Msg) -> None:
            await got["plain"].put(msg.headers)

        await bus.nc.subscribe("test.headers", cb=on_bus)
        await plain.subscribe("test.headers", cb=on_plain)
        await bus.nc.flush()
        await plain.flush()
        sent = [{"Ba-Contract": "X", "Ba-Version": "1"}, {"City": "Zürich", "Ba-Sender": "me"}]
        for headers in sent:
            await sender.publish("test.headers", b"{}", headers=headers)
        await sender.flush()
        for headers in sent:
            from_bus = await asyncio.wait_for(got["bus"].get(), 5)
            from_plain = await asyncio.wait_for(got["plain"].get(), 5)
            assert from_bus == from_plain == headers
    finally:
        for nc in (sender, bus.nc, plain):
            await nc.close()
