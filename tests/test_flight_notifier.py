"""The notifier: one rendered notice per passenger and outcome, in the outbox before PassengerNotified says so.

``BookingsChanged`` is delivered at least once; the outbox must still end with exactly one line
per (decision_id, passenger_id), whatever the replicas sharing it, the redeliveries and the kills.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from busagents_flight.notifier import Channel, Notice, Notifier, OutboxChannel
from busagents_travel import BookingChanged, BookingsChanged, Cost, Leg, Passenger, PassengerNotified
from busagents_travel.messages import RebookAction
from nats.aio.msg import Msg

from busagents import Bus, NatsServer
from busagents.envelope import CAUSATION_ID
from busagents.testing import run_agents

OLD = Leg("BX124-25NOV", "BX124", "LHR", "AMS", 1_764_064_800, 1_764_069_000, "Y", ["12A", "12B", "12C"])
NEW = Leg("BX128-25NOV", "BX128", "LHR", "AMS", 1_764_079_200, 1_764_083_400, "Y", ["7C", "7D", "7E"])
STREAM, CONSUMER = "BA_BookingsChanged", "flight-notifier"


def two_passenger_change() -> BookingChanged:
    return BookingChanged(
        decision_id="d-1", disruption_id="BX124-25NOV#1", booking_id="ABC123", flight_id="BX124-25NOV",
        action="rebook", passengers=[Passenger("p-1", "Ada Lovelace"), Passenger("p-2", "Charles Babbage")],
        old_legs=[OLD], new_legs=[NEW], rationale="BX124 was cancelled; BX128 is the earliest arrival",
    )  # fmt: skip


def changes(n: int) -> list[BookingChanged]:
    """``n`` distinct booking changes (rebook, refund, keep) of 1 to 3 passengers each."""
    out = []
    for i in range(n):
        passengers = [Passenger(f"p-{i}-{k}", f"Traveller {i} {k}") for k in range(i % 3 + 1)]
        action: RebookAction = ("rebook", "refund", "keep")[i // 3 % 3]
        out.append(
            BookingChanged(
                decision_id=f"d-{i}",
                disruption_id=f"BX124-25NOV#{i % 7}",
                booking_id=f"B{i:05d}",
                flight_id="BX124-25NOV",
                action=action,
                passengers=passengers,
                old_legs=[OLD],
                new_legs=[NEW] if action == "rebook" else [],
                cost=Cost(refund=12_000) if action == "refund" else Cost(),
                rationale="BX124 was cancelled",
            )
        )
    return out


def one(change: BookingChanged) -> BookingsChanged:
    """A change as the rebooker sends a single decision's: a group of one."""
    return BookingsChanged(group_id=change.decision_id, changes=[change])


def keys_of(batch: Sequence[BookingChanged]) -> Counter[tuple[str, str]]:
    """Each (decision_id, passenger_id) of ``batch`` once: what the outbox must hold."""
    return Counter((c.decision_id, p.passenger_id) for c in batch for p in c.passengers)


def complete_lines(outbox: Path) -> list[bytes]:
    """The outbox's lines as a reader sees them while notifiers write: a last line without a newline is
    being written (or was torn by a kill) and is not there yet."""
    data = outbox.read_bytes() if outbox.exists() else b""
    return data[: data.rfind(b"\n") + 1].splitlines()


def valid_notices(outbox: Path) -> list[dict[str, Any]]:
    """Every line of the outbox, each a whole JSON notice; the file ends with a newline (nothing torn)."""
    data = outbox.read_bytes()
    assert data.endswith(b"\n"), f"the outbox ends with a torn line: {data[-120:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def key_counts(notices: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((n["decision_id"], n["passenger_id"]) for n in notices)


def notice(decision_id: str, passenger_id: str, text: str = "Your booking stays as it is.") -> Notice:
    return Notice(
        decision_id=decision_id, disruption_id="BX124-25NOV#1", passenger_id=passenger_id, name="Ada Lovelace",
        booking_id="ABC123", subject="Booking ABC123", text=text,
    )  # fmt: skip


async def test_each_passenger_is_in_the_outbox_when_their_notification_is_published(bus: Bus, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    in_outbox: list[int] = []  # lines in the outbox when each PassengerNotified arrived
    both = asyncio.Event()

    async def on_notified(msg: Msg) -> None:
        in_outbox.append(len(outbox.read_text().splitlines()) if outbox.exists() else 0)
        if len(in_outbox) == 2:
            both.set()

    async with run_agents(bus, Notifier(OutboxChannel(outbox))):
        sub = await bus.nc.subscribe("travel.passenger.notified.>", cb=on_notified)
        async with bus.expect(PassengerNotified, count=2) as got:
            await bus.publish(one(two_passenger_change()))
        await asyncio.wait_for(both.wait(), 10)
        await sub.unsubscribe()
        # read while the notifier still runs: nothing may wait in a buffer until it stops
        assert in_outbox[0] >= 1 and in_outbox[1] == 2, in_outbox
        notices = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert {n["passenger_id"] for n in notices} == {"p-1", "p-2"}
    assert {(n["decision_id"], n["disruption_id"]) for n in notices} == {("d-1", "BX124-25NOV#1")}
    assert {m.body.passenger_id for m in got.messages} == {"p-1", "p-2"}
    assert all("BX128" in m.body.text for m in got.messages)


async def test_a_change_delivered_twice_writes_each_passenger_once_and_is_reported_both_times(
    bus: Bus, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    change = two_passenger_change()
    async with run_agents(bus, Notifier(OutboxChannel(outbox))):
        async with bus.expect(PassengerNotified, count=4, timeout=10) as got:
            await bus.publish(one(change), msg_id="change-1")
            await bus.publish(one(change), msg_id="change-1-again")
    assert key_counts(valid_notices(outbox)) == keys_of([change])
    # the second delivery still publishes its events (the outbox had them already)
    assert Counter(m.envelope.causation_id for m in got.messages) == {"change-1": 2, "change-1-again": 2}
    assert Counter(m.body.passenger_id for m in got.messages) == {"p-1": 2, "p-2": 2}


async def test_two_notifiers_sharing_one_outbox_write_each_passenger_once_per_outcome(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    batch = changes(300)
    repeated = batch[::3]  # each published again right after itself: the copies race on the other notifier
    reports = sum(len(c.passengers) for c in batch) + sum(len(c.passengers) for c in repeated)
    other = await Bus.connect(nats_server.url, name="second-notifier")
    try:
        async with (
            run_agents(bus, Notifier(OutboxChannel(outbox))) as first_worker,
            run_agents(other, Notifier(OutboxChannel(outbox))) as second_worker,
        ):
            async with bus.expect(PassengerNotified, count=reports, timeout=60) as got:
                for i, change in enumerate(batch):
                    await bus.publish(one(change), msg_id=f"change-{i}")
                    if i % 3 == 0:
                        await bus.publish(one(change), msg_id=f"change-{i}-again")
            handled = [w.stats[CONSUMER].handled for w in (first_worker, second_worker)]
    finally:
        await other.close()
    assert key_counts(valid_notices(outbox)) == keys_of(batch)
    assert len(got.messages) == reports
    assert sum(handled) == len(batch) + len(repeated), handled


async def test_a_torn_last_line_is_cut_and_a_notice_sent_before_a_restart_is_not_repeated(
    bus: Bus, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    before = notice("d-1", "p-1", text="written before the restart")
    torn = b'{"decision_id":"d-0","disruption_id":"BX124-25NOV#1","passenger_id":"p-9","na'
    outbox.write_bytes(msgspec.json.encode(before) + b"\n" + torn)  # a notifier was killed mid-write
    async with run_agents(bus, Notifier(OutboxChannel(outbox))):
        async with bus.expect(PassengerNotified, count=2) as got:
            await bus.publish(one(two_passenger_change()))
    notices = valid_notices(outbox)
    assert [(n["decision_id"], n["passenger_id"]) for n in notices] == [("d-1", "p-1"), ("d-1", "p-2")]
    assert notices[0]["text"] == "written before the restart"
    assert {m.body.passenger_id for m in got.messages} == {"p-1", "p-2"}


async def test_outbox_channels_racing_on_one_file_append_each_notice_once(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    batches = [[notice(f"d-{i}", f"p-{k}") for k in range(i % 3 + 1)] for i in range(200)]
    first, second = OutboxChannel(outbox), OutboxChannel(outbox)
    try:
        # every batch sent by both channels at once: two threads contend for the file's lock on each
        await asyncio.gather(*(channel.send_many(b) for b in batches for channel in (first, second)))
    finally:
        await first.close()
        await second.close()
    expected = Counter((n.decision_id, n.passenger_id) for b in batches for n in b)
    assert key_counts(valid_notices(outbox)) == expected
    restarted = OutboxChannel(outbox)  # knows the file's notices from the file alone
    try:
        await restarted.open()
        await restarted.send_many([notice("d-0", "p-0"), notice("d-new", "p-0")])
    finally:
        await restarted.close()
    assert key_counts(valid_notices(outbox)) == expected + Counter({("d-new", "p-0"): 1})


async def test_an_outbox_moved_away_is_recreated_at_its_path(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.jsonl"
    channel = OutboxChannel(outbox)
    try:
        await channel.send(notice("d-1", "p-1"))
        outbox.rename(tmp_path / "outbox.1.jsonl")  # rotated by an operator while the notifier runs
        await channel.send(notice("d-2", "p-1"))
    finally:
        await channel.close()
    assert key_counts(valid_notices(outbox)) == {("d-2", "p-1"): 1}
    assert key_counts(valid_notices(tmp_path / "outbox.1.jsonl")) == {("d-1", "p-1"): 1}


async def test_a_custom_channel_gets_a_batch_one_notice_at_a_time() -> None:
    class Recorder(Channel):
        def __init__(self) -> None:
            self.sent: list[str] = []

        async def send(self, notice: Notice) -> None:
            self.sent.append(notice.passenger_id)

    channel = Recorder()
    await channel.send_many([notice("d-1", "p-1"), notice("d-1", "p-2")])
    assert channel.sent == ["p-1", "p-2"]


# Real processes: two notifier replicas on one outbox, one SIGKILLed mid-stream and restarted

KILL_CHANGES = 1500


async def spawn_notifier(url: str, outbox: Path) -> asyncio.subprocess.Process:
    """``busagents run flight-notifier`` as its own OS process; unacknowledged changes come back after 2 s."""
    env = {
        **os.environ,
        "BUSAGENTS_FLIGHT_OUTBOX": str(outbox),
        "BUSAGENTS_ACK_WAIT": "2",
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
    }
    cmd = [sys.executable, "-m", "busagents", "--log-level", "ERROR", "run", "flight-notifier", "--nats", url]
    return await asyncio.create_subprocess_exec(*cmd, env=env, cwd=outbox.parent, stdin=asyncio.subprocess.DEVNULL)


async def serving(bus: Bus, replicas: int, timeout: float = 30.0) -> None:
    """Wait until ``replicas`` notifier processes heartbeat (they have subscribed)."""
    stats = await bus.nc.subscribe(f"busagents.stats.{CONSUMER}")
    try:
        instances: set[str] = set()
        while len(instances) < replicas:
            beat = await stats.next_msg(timeout=timeout)
            instances.add(msgspec.json.decode(beat.data)["instance"])
    finally:
        await stats.unsubscribe()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``predicate`` (a read of the outbox or the consumer) until true; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def settled(bus: Bus) -> bool:
    """The notifiers' consumer has nothing pending nor unacknowledged: no notice can still come."""
    try:
        info = await bus.js.consumer_info(STREAM, CONSUMER)
    except (nats.errors.Error, nats.js.errors.Error):
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_notifier_replica_killed_mid_stream_and_restarted_notifies_each_passenger_exactly_once(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.jsonl"
    batch = changes(KILL_CHANGES)
    expected = keys_of(batch)
    again: dict[str, int] = {}  # decision id -> passengers, of the changes published again after the kill
    reported_again: Counter[str] = Counter()  # PassengerNotified caused by those second deliveries, per decision
    all_reported = asyncio.Event()

    async def on_notified(msg: Msg) -> None:
        if (msg.headers or {}).get(CAUSATION_ID, "").endswith("-again"):
            reported_again[json.loads(msg.data)["decision_id"]] += 1
            if reported_again == again:
                all_reported.set()

    async def published(changes: Sequence[BookingChanged], suffix: str = "") -> None:
        for change in changes:
            await bus.publish(one(change), msg_id=f"{change.decision_id}{suffix}")

    sub = await bus.nc.subscribe("travel.passenger.notified.>", cb=on_notified)
    replicas = [await spawn_notifier(nats_server.url, outbox), await spawn_notifier(nats_server.url, outbox)]
    try:
        await serving(bus, replicas=2)

        async def a_quarter_written() -> bool:
            return len(complete_lines(outbox)) >= len(expected) // 4

        async with asyncio.TaskGroup() as tg:  # kill while the day is still being published
            for i in range(16):
                tg.create_task(published(batch[i::16]))
            await wait_until(a_quarter_written, 60, "a quarter of the notices")
            replicas[0].send_signal(signal.SIGKILL)
            await replicas[0].wait()
            at_kill = key_counts([json.loads(line) for line in complete_lines(outbox)])
        assert sum(at_kill.values()) < len(expected), "the notifiers finished before the kill: nothing was tested"

        # changes already notified, delivered again (to the survivor or the restarted replica): no second line
        done = [c for c in batch if all((c.decision_id, p.passenger_id) in at_kill for p in c.passengers)][:100]
        again.update({c.decision_id: len(c.passengers) for c in done})
        replicas[0] = await spawn_notifier(nats_server.url, outbox)
        await published(done, suffix="-again")

        async def every_notice_written() -> bool:
            return len(complete_lines(outbox)) >= len(expected) and await settled(bus)

        await wait_until(every_notice_written, 120, f"{len(expected)} notices and a settled consumer")
        await asyncio.wait_for(all_reported.wait(), 30)
    finally:
        await sub.unsubscribe()
        for proc in replicas:
            await stop(proc)
    notices = valid_notices(outbox)
    counts = key_counts(notices)
    print(
        f"\nnotifier kill: {len(batch)} changes, {len(expected)} passengers; killed at {sum(at_kill.values())} "
        f"lines; {len(done)} notified changes delivered again; outbox {len(notices)} lines"
    )
    assert not {k: n for k, n in counts.items() if n > 1}, "passengers notified twice"
    assert counts == expected, f"missing {sorted(expected - counts)[:5]}"
    assert len(done) > 0
    assert reported_again == again  # the repeated deliveries were still reported
