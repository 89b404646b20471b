"""The embedded nats-server starts on a free loopback port with JetStream and stops cleanly."""

from __future__ import annotations

from busagents import Bus
from busagents.server import NatsServer, find_server_binary, is_reachable


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
