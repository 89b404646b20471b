"""Replaying a recorded conversation in a namespace: decided again there, production sees nothing."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import msgspec
import pytest
from busagents_flight.context import ContextAgent
from busagents_flight.data import generate
from busagents_flight.reasoner import ReasonerAgent
from busagents_flight.rebooker import Rebooker
from busagents_flight.store import open_store
from busagents_travel import FlightCancelled, RebookPassenger
from nats.aio.msg import Msg

from busagents import Bus, NatsServer
from busagents.convlog import ConversationLog, ensure_conversation_log
from busagents.errors import ConfigError
from busagents.observe import Catalog
from busagents.plugins import available_contracts
from busagents.replay import default_namespace, replay_conversation
from busagents.subjects import namespace_prefix
from busagents.testing import run_agents

from .drain_agent import Done, Job, Slow, child_env
from .flight_expect import expect_changes, expect_decisions

DAY = generate(flights=24, passengers=1500, seed=9)


def _decided(d: RebookPassenger) -> tuple[str, str, tuple[str, ...], tuple[str, ...], int]:
    return (
        d.booking_id,
        d.action,
        tuple(leg.flight_id for leg in d.new_legs),
        tuple(leg.cabin for leg in d.new_legs),
        d.cost.refund,
    )


def test_a_namespace_is_dot_separated_tokens_outside_reserved_subjects() -> None:
    assert namespace_prefix("replay.c1") == namespace_prefix("replay.c1.") == "replay.c1."
    assert namespace_prefix("") == ""
    for bad in ("replay..c1", "replay c1", "busagents.dlq", "$JS.x", "_INBOX.x", "a.*"):
        with pytest.raises(ConfigError):
            namespace_prefix(bad)
    assert default_namespace("a:b/c") == "replay.a_b_c."


async def test_a_replayed_conversation_is_decided_again_in_its_namespace_and_production_sees_nothing(
    bus: Bus, tmp_path: Path
) -> None:
    flight = max(DAY.flights, key=lambda f: sum(1 for b in DAY.bookings if b.legs[0].flight_id == f.flight_id))
    on_it = [b for b in DAY.bookings if any(leg.flight_id == flight.flight_id for leg in b.legs)]
    cancelled = FlightCancelled(
        disruption_id=f"{flight.flight_id}#1", flight_id=flight.flight_id, number=flight.number,
        origin=flight.origin, destination=flight.destination, reason="crew", observed_at=flight.departure - 7200,
    )  # fmt: skip
    store = open_store(f"{tmp_path}/live.sqlite3")
    live = (ContextAgent(DAY), ReasonerAgent("offline"), Rebooker(store, DAY))
    async with run_agents(bus, *live):
        async with (
            expect_changes(bus, count=len(on_it), timeout=30),
            expect_decisions(bus, count=len(on_it), timeout=30) as decided,
        ):
            conversation = (await bus.publish(cancelled)).conversation_id
        assert conversation
        before = sorted(msgspec.json.encode(b) for b in await store.bookings())
        assert len(before) == len(DAY.bookings)

        # production agents still run: none of them may see the replay
        seen_live: list[str] = []

        async def on_live(msg: object) -> None:
            seen_live.append(msg.subject)  # type: ignore[attr-defined]

        watcher = await bus.nc.subscribe("travel.>", cb=on_live)
        namespace = Bus(bus.nc, prefix=default_namespace(conversation))
        catalog = Catalog(available_contracts()[0])
        async with run_agents(namespace, ContextAgent(DAY), ReasonerAgent("offline")):
            async with expect_decisions(namespace, count=len(on_it), timeout=30) as replayed:
                done = await replay_conversation(bus, conversation, namespace, catalog, subjects=["travel.flight.>"])
        await bus.nc.flush()
        await watcher.unsubscribe()

    assert [r.contract for r in done] == ["FlightCancelled"]
    assert done[0].subject.startswith(namespace.prefix + "travel.flight.cancelled.")
    assert sorted(map(_decided, replayed.items)) == sorted(map(_decided, decided.items))
    assert seen_live == []
    assert sorted(msgspec.json.encode(b) for b in await open_store(f"{tmp_path}/live.sqlite3").bookings()) == before
    # the namespace kept its own streams: the replayed input and the new decisions are there, not in production's
    assert (await bus.js.stream_info(namespace.stream_name("BA_RebookGroup"))).state.messages == replayed.groups
    assert (await bus.js.stream_info("BA_FlightCancelled")).state.messages == 1


async def _busagents(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_busagents_replay_publishes_a_conversation_under_the_prefix_given(
    bus: Bus, nats_server: NatsServer
) -> None:
    flight = DAY.flights[0]
    cancelled = FlightCancelled(
        disruption_id=f"{flight.flight_id}#9", flight_id=flight.flight_id, number=flight.number,
        origin=flight.origin, destination=flight.destination, reason="weather", observed_at=flight.departure,
    )  # fmt: skip
    conversation = (await bus.publish(cancelled)).conversation_id
    assert conversation
    code, out, err = await _busagents(
        "replay",
        "--conversation",
        conversation,
        "--nats",
        nats_server.url,
        "--into",
        "replay.cli",
        "--speed",
        "original",
    )
    assert code == 0, err
    assert f"FlightCancelled          replay.cli.travel.flight.cancelled.{flight.flight_id}" in out
    assert f"replayed 1 messages of {conversation} under replay.cli." in out
    stored = await bus.js.get_last_msg(
        "replay_cli_BA_FlightCancelled", f"replay.cli.travel.flight.cancelled.{flight.flight_id}"
    )
    assert msgspec.json.decode(stored.data or b"", type=FlightCancelled) == cancelled
    assert (await bus.js.stream_info("BA_FlightCancelled")).state.messages == 1  # production's copy only

    with NatsServer() as other:  # --to-nats: another server, production's subjects there
        code, out, err = await _busagents(
            "replay", "--conversation", conversation, "--nats", nats_server.url, "--to-nats", other.url
        )
        assert code == 0, err
        assert f"replayed 1 messages of {conversation} under (no prefix) on {other.url}" in out
        async with await Bus.connect(other.url) as there:
            copy = await there.js.get_last_msg("BA_FlightCancelled", f"travel.flight.cancelled.{flight.flight_id}")
        assert msgspec.json.decode(copy.data or b"", type=FlightCancelled) == cancelled

    code, out, err = await _busagents("replay", "--conversation", "no-such-conversation", "--nats", nats_server.url)
    assert code == 1 and "nothing to replay" in err and "Traceback" not in err
    code, out, err = await _busagents(
        "replay", "--conversation", conversation, "--nats", nats_server.url, "--into", "a..b"
    )
    assert code == 1 and "invalid subject prefix 'a..b'" in err and "Traceback" not in err


async def test_busagents_run_namespace_runs_the_agent_under_the_prefix_only(bus: Bus) -> None:
    production: list[str] = []

    async def on_production(msg: Msg) -> None:
        production.append(msg.subject)

    beats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.nc.subscribe("test.drain.>", cb=on_production)
    url = bus.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "run", "drain_agent:Slow", "--nats", url, "--namespace", "trial.t1",
        env=child_env(), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await beats.next_msg(timeout=30)
        trial = Bus(bus.nc, prefix="trial.t1")
        async with trial.expect(Done, timeout=20) as done:
            await trial.publish(Job(n=3))
        await bus.publish(Job(n=4))  # production's job: nobody there takes it
        await bus.nc.flush()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert done.message.body == Done(n=3) and done.message.subject == "trial.t1.test.drain.done"
    assert "running slow on" in err.decode() and "under trial.t1." in err.decode()
    assert production == ["test.drain.job"]  # only the job published there; nothing answered it


async def test_core_messages_kept_by_the_conversation_log_are_replayed_on_core_nats_under_the_prefix(bus: Bus) -> None:
    assert "test.drain.job" in await ensure_conversation_log(bus, [Slow()], ConversationLog())
    first = await bus.publish(Job(n=1))
    await bus.publish(Job(n=2), cause=first)  # the same conversation
    await bus.publish(Job(n=3))  # another one
    namespace = Bus(bus.nc, prefix="replay.log")
    async with namespace.expect(Job, count=2, timeout=10) as replayed:
        done = await replay_conversation(bus, first.conversation_id or "", namespace, Catalog([Job]))
    assert [r.subject for r in done] == ["replay.log.test.drain.job"] * 2
    assert [m.body.n for m in replayed.messages] == [1, 2]
    assert replayed.message.envelope == first  # the recorded envelope, as it was
