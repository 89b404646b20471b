"""The embedded nats-server starts on a free loopback port with JetStream and stops cleanly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest

from busagents import Bus
from busagents.errors import NatsUnavailableError
from busagents.server import NatsServer, find_server_binary, is_reachable

from .drain_agent import exited


def test_server_binary_comes_from_the_wheel() -> None:
    assert find_server_binary().endswith("nats-server")


async def test_embedded_server_starts_serves_jetstream_and_stops() -> None:
    server = NatsServer()
    assert server.port != 4222
    with server:
        store = server.store_dir
        assert store is not None and store.exists()
        assert is_reachable(server.url)
        bus = await Bus.connect(server.url)
        try:
            info = await bus.nc.jetstream().account_info()
            assert info.limits is not None  # JetStream answers
            sub = await bus.nc.subscribe("ping")
            await bus.nc.publish("ping", b"1")
            assert (await sub.next_msg(timeout=2)).data == b"1"
        finally:
            await bus.close()
    assert not is_reachable(server.url)
    assert not store.exists()  # the temporary store is removed


@asynccontextmanager
async def loop_turns() -> AsyncIterator[list[int]]:
    """Counts how often the event loop ran another task during the block (0: something blocked it)."""
    turns = [0]

    async def turn() -> None:
        while True:
            await asyncio.sleep(0)
            turns[0] += 1

    ticker = asyncio.create_task(turn())
    await asyncio.sleep(0)
    try:
        yield turns
    finally:
        ticker.cancel()


async def timed_turns(work: Awaitable[object]) -> int:
    async with loop_turns() as turns:
        await work
    return turns[0]


async def test_async_start_restart_and_stop_leave_the_event_loop_running() -> None:
    server = NatsServer()
    assert await timed_turns(server.astart()) > 10  # the sync start holds the loop for the whole start
    try:
        bus = await Bus.connect(server.url)
        try:
            assert (await bus.js.account_info()).limits is not None  # JetStream answers
        finally:
            await bus.close()
        store = server.store_dir
        assert await timed_turns(server.arestart()) > 10
        assert server.store_dir == store and is_reachable(server.url)
    finally:
        assert await timed_turns(server.astop()) > 10
    assert not is_reachable(server.url)
    assert store is not None and not store.exists()


def nats_server_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.name() == "nats-server"]


async def test_an_async_start_that_fails_half_way_leaves_no_server() -> None:
    before = {p.pid for p in nats_server_children()}
    server = NatsServer()
    with pytest.raises(NatsUnavailableError, match="did not accept connections"):
        await server.astart(timeout=0)  # out of time at the first check: the child runs, not serving yet
    assert server.process is None
    assert [p for p in nats_server_children() if p.pid not in before and p.is_running()] == []
    assert server.store_dir is None  # its temporary store is removed too


async def test_kill_keeps_the_store_and_restart_serves_again(tmp_path: object) -> None:
    server = NatsServer()
    server.start()
    try:
        store = server.store_dir
        server.kill()
        assert not is_reachable(server.url)
        assert store is not None and store.exists()
        server.start()
        assert is_reachable(server.url)
    finally:
        server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_store_left_by_a_sigkilled_owner_is_removed_by_the_next_start_and_a_live_ones_is_kept() -> None:
    code = (
        "import sys; from busagents.server import NatsServer; s = NatsServer().start(); "
        "assert s.process is not None; print(s.store_dir, s.process.pid, flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None and owner.stdin is not None
    store, server_pid = owner.stdout.readline().split()
    owner.kill()
    owner.wait()
    owner.stdin.close()
    owner.stdout.close()
    # SIGTERMed by the kernel as its owner died
    assert exited([int(server_pid)]) == [], "the embedded nats-server outlived its SIGKILLed owner"
    assert Path(store).exists()  # nats-server cannot remove its own store
    with NatsServer() as live:
        assert not Path(store).exists()
        assert live.store_dir is not None
        with NatsServer():
            assert live.store_dir.exists()  # its owner (this process) runs: not stale
