"""The embedded nats-server starts on a free loopback port with JetStream and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from busagents import Bus
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
