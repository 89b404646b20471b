"""Agent state in JetStream key-value buckets: typed values, compare-and-set, declared buckets, permissions."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import nats.errors
import pydantic
import pytest

from busagents import (
    Agent,
    Bus,
    ConfigError,
    Context,
    ContractError,
    DecodeError,
    NatsServer,
    StateConflictError,
    Worker,
    event,
    on,
)
from busagents.swarm import Graph
from busagents.swarm.graph import inbox_prefix
from busagents.testing import run_agents


class Tally(msgspec.Struct):
    count: int = 0
    last: int = -1


class Profile(pydantic.BaseModel):
    name: str
    tier: str = "basic"


@event("test.state.seen", key="flight_id")
class Seen(msgspec.Struct):
    flight_id: str
    n: int


@event("test.state.counted")
class Counted(msgspec.Struct):
    flight_id: str
    count: int


class Counter(Agent):
    """Counts sightings per flight in the shared ``tallies`` bucket, compare-and-set against other replicas."""

    name = "state-counter"
    produces = (Counted,)
    state_buckets = ("tallies",)

    def __init__(self) -> None:
        self.conflicts = 0

    @on(Seen)
    async def seen(self, msg: Seen, ctx: Context) -> Counted:
        tallies = await ctx.state("tallies", Tally)
        while True:
            entry = await tallies.entry(msg.flight_id)
            try:
                if entry is None:
                    await tallies.create(msg.flight_id, Tally(count=1, last=msg.n))
                    return Counted(msg.flight_id, 1)
                new = Tally(count=entry.value.count + 1, last=msg.n)
                await tallies.update(msg.flight_id, new, revision=entry.revision)
                return Counted(msg.flight_id, new.count)
            except StateConflictError:
                self.conflicts += 1  # another replica wrote first: read again, count again


async def test_two_replicas_sharing_a_bucket_lose_no_update_and_a_new_replica_finds_the_state(
    nats_server: NatsServer,
) -> None:
    keys, per_key = 4, 60
    buses = [await Bus.connect(nats_server.url) for _ in range(3)]
    replicas = [Counter(), Counter()]
    try:
        workers = [Worker([agent], bus) for agent, bus in zip(replicas, buses, strict=False)]
        await asyncio.gather(*(w.start() for w in workers))
        try:
            async with buses[2].expect(Counted, count=keys * per_key, timeout=30) as got:
                for n in range(per_key):
                    await asyncio.gather(*(buses[2].publish(Seen(f"F{k}", n)) for k in range(keys)))
        finally:
            await asyncio.gather(*(w.drain() for w in workers))
        async with run_agents(buses[2], Counter()):  # a fresh replica, in another connection
            tallies = await buses[2].state("tallies", Tally)
            stored = {key: await tallies.get(key) for key in await tallies.keys()}
    finally:
        for bus in buses:
            await bus.close()
    assert sorted(stored) == [f"F{k}" for k in range(keys)]
    assert all(t is not None and t.count == per_key for t in stored.values()), stored
    # every handled message saw its own count: no two handlers read the same revision and both won
    for k in range(keys):
        counts = sorted(r.body.count for r in got.messages if r.body.flight_id == f"F{k}")
        assert counts == list(range(1, per_key + 1))
    assert all(w.stats["state-counter"].handled > 0 for w in workers)  # both replicas worked


async def test_every_listing_of_a_buckets_keys_has_every_key(nats_server: NatsServer) -> None:
    """nats-py's KeyValue.keys() could end a listing before its first key (it counted what was left to
    deliver after the server had sent it all): about 1 listing in 100 came back empty, and a replica
    that lists its bucket to recover would have found nothing. Each of these listings opens the bucket
    anew in another connection, as a fresh replica does."""
    writer, reader = await Bus.connect(nats_server.url), await Bus.connect(nats_server.url)
    try:
        profiles = await writer.state("listed", Profile)
        for k in range(4):
            await profiles.put(f"p-{k}", Profile(name=f"P{k}"))
        await profiles.put("gone", Profile(name="Gone"))
        await profiles.delete("gone")
        wrong = []
        for i in range(150):
            listed = await (await reader.state("listed", Profile)).keys()
            if listed != ["p-0", "p-1", "p-2", "p-3"]:
                wrong.append((i, listed))
        assert wrong == []
    finally:
        await writer.close()
        await reader.close()


async def test_typed_values_revisions_conflicts_and_deletes(bus: Bus) -> None:
    profiles = await bus.state("profiles", Profile)
    assert await profiles.get("p-1") is None and await profiles.keys() == []
    first = await profiles.create("p-1", Profile(name="Ada"))
    with pytest.raises(StateConflictError, match="profiles/p-1 exists already"):
        await profiles.create("p-1", Profile(name="Eve"))
    second = await profiles.update("p-1", Profile(name="Ada", tier="gold"), revision=first)
    assert second > first
    with pytest.raises(StateConflictError, match=f"changed since revision {first}"):
        await profiles.update("p-1", Profile(name="Mallory"), revision=first)
    entry = await profiles.entry("p-1")
    assert entry is not None and entry.value == Profile(name="Ada", tier="gold") and entry.revision == second
    await profiles.put("p-2", Profile(name="Bob"))
    assert await profiles.keys() == ["p-1", "p-2"]
    await profiles.delete("p-1")
    assert await profiles.get("p-1") is None and await profiles.keys() == ["p-2"]
    # a deleted key can be created again (its delete marker is the subject's last message)
    assert await profiles.create("p-1", Profile(name="Eve")) > second
    assert await profiles.get("p-1") == Profile(name="Eve")
    await profiles.delete("p-1")
    # stored as plain JSON: any NATS client reads it
    raw = await bus.js.key_value("profiles")
    assert json.loads((await raw.get("p-2")).value or b"") == {"name": "Bob", "tier": "basic"}
    # one replica: read by direct get (what every read above went through, deletes included)
    assert (await bus.js.stream_info("KV_profiles")).config.allow_direct


async def test_bad_keys_bad_values_and_bad_bucket_names_are_clear_errors(bus: Bus) -> None:
    tallies = await bus.state("tallies", Tally)
    for key in ("has space", "", ".lead", "trail.", "a..b", "wild*"):
        with pytest.raises(ConfigError, match="invalid key"):
            await tallies.put(key, Tally())
    raw = await bus.js.key_value("tallies")
    await raw.put("broken", b'{"count": "many"}')
    with pytest.raises(DecodeError, match=r"state tallies/broken is not a valid Tally: .*\$\.count"):
        await tallies.get("broken")
    with pytest.raises(ConfigError, match="invalid state bucket name"):
        await bus.state("no.dots", Tally)


async def test_an_agent_uses_only_the_buckets_it_declared(bus: Bus) -> None:
    class Nosy(Agent):
        name = "state-nosy"
        state_buckets = ("mine",)

        def __init__(self) -> None:
            self.error = ""

        @on(Seen)
        async def seen(self, msg: Seen, ctx: Context) -> None:
            await (await ctx.state("mine", Tally)).put(msg.flight_id, Tally(count=1))
            try:
                await ctx.state("theirs", Tally)
            except ConfigError as exc:
                self.error = str(exc)
            raise RuntimeError("done")  # dead-letters: the signal that the handler ran to the end

    nosy = Nosy()
    async with run_agents(bus, nosy):
        dead = await bus.nc.subscribe("busagents.dlq.state-nosy")
        await bus.publish(Seen("F1", 1))
        await dead.next_msg(timeout=10)
    assert nosy.error == "agent 'state-nosy' may not use the state bucket 'theirs': add it to Nosy.state_buckets"
    assert (await (await bus.state("mine", Tally)).get("F1")) == Tally(count=1)
    with pytest.raises(ContractError, match="state_buckets must be a tuple of bucket names"):

        class Wrong(Agent):
            state_buckets = "mine"  # type: ignore[assignment]


async def test_the_swarm_permissions_of_a_stateful_agent_are_enough_to_use_its_bucket(tmp_path: Path) -> None:
    perms = Graph([Counter]).permissions()["state-counter"]
    assert "$KV.tallies.>" in perms["publish"] and "$KV.other.>" not in perms["publish"]
    users = [
        {"user": "counter", "password": "pw", "permissions": {"publish": {"allow": perms["publish"]},
                                                             "subscribe": {"allow": perms["subscribe"]}}},
        {"user": "admin", "password": "pw"},
    ]  # fmt: skip
    config = tmp_path / "nats.conf"
    config.write_text("authorization { users = " + json.dumps(users) + " }\n")
    with NatsServer(config_file=config) as server:
        admin = await Bus.connect(server.url.replace("nats://", "nats://admin:pw@"))
        inbox = inbox_prefix("state-counter")  # as `busagents run` connects it
        counter = await Bus.connect(server.url.replace("nats://", "nats://counter:pw@"), inbox_prefix=inbox)
        denied: list[str] = []

        async def note(exc: Exception) -> None:
            denied.append(str(exc))

        other = await Bus.connect(
            server.url.replace("nats://", "nats://counter:pw@"), inbox_prefix=inbox, error_cb=note
        )
        try:
            await (await admin.state("other", Tally)).put("x", Tally())
            tallies = await counter.state("tallies", Tally)  # creates the bucket
            revision = await tallies.put("F1", Tally(count=1))
            await tallies.update("F1", Tally(count=2), revision=revision)
            assert await tallies.get("F1") == Tally(count=2)
            assert await tallies.keys() == ["F1"]
            await tallies.delete("F1")
            with pytest.raises(nats.errors.TimeoutError):  # the server drops what it does not allow
                await other.nc.request("$KV.other.x", b"{}", timeout=1)
        finally:
            for bus in (admin, counter, other):
                await bus.close()
    assert any('permissions violation for publish to "$kv.other.x"' in d.lower() for d in denied), denied
    assert not any("tallies" in d for d in denied), denied


async def test_a_watch_gives_the_current_values_then_each_new_one(bus: Bus) -> None:
    tallies = await bus.state("watched", Tally)
    await tallies.put("F1.a", Tally(count=1))
    await tallies.put("F2.a", Tally(count=7))
    async with asyncio.timeout(10), tallies.watch("F1.*") as changes:
        first = await anext(changes)  # what is there already
        await tallies.put("F2.a", Tally(count=8))  # not matched
        await tallies.delete("F1.a")  # deletions are not reported
        await tallies.put("F1.b", Tally(count=2))
        second = await anext(changes)
    assert (first.key, first.value) == ("F1.a", Tally(count=1))
    assert (second.key, second.value) == ("F1.b", Tally(count=2)) and second.revision > first.revision
    with pytest.raises(ConfigError, match="invalid key pattern"):
        tallies.watch(">.x")
