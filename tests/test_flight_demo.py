"""The flight assistant end to end: the demo over a real (embedded) nats-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import nats.errors
import pytest
from busagents_flight import stand_in
from busagents_flight.demo import run_demo
from busagents_travel import DisruptionAssessed

from busagents import Bus
from busagents.llm.testing import MessagesServer
from busagents.server import NatsServer

REPORT_KEYS = {"disruptions", "affected", "rebooked", "notified", "dead_lettered", "latency_ms"}


async def test_demo_notifies_every_affected_passenger_and_dead_letters_nothing() -> None:
    report = await run_demo(flights=40, passengers=3000, seed=11, timeout=60)
    assert report.disruptions > 0
    assert report.affected > 0
    assert report.notified == report.affected
    assert report.dead_lettered == 0
    assert report.seat_conflicts == 0
    assert report.stranded == 0
    assert report.rebooked > 0
    assert report.rebooked + report.refunded + report.kept >= report.affected
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p99"]


def test_busagents_demo_writes_the_report(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "busagents", "demo", "--quiet", "--report", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    report = json.loads(path.read_text())
    assert report.keys() >= REPORT_KEYS
    assert set(report["latency_ms"]) == {"p50", "p99"}
    assert report["notified"] == report["affected"] > 0
    assert report["dead_lettered"] == 0
    assert report["seat_conflicts"] == 0
    assert "summary" in done.stdout


def test_a_store_that_cannot_be_opened_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "bookings.sqlite3"
    done = subprocess.run(
        [sys.executable, "-m", "busagents", "demo", "--quiet", "--store", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"cannot open the SQLite booking store {missing}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_demo_with_agents_in_their_own_processes_serves_every_affected_passenger() -> None:
    report = await run_demo(flights=24, passengers=1500, seed=3, processes=True, timeout=90)
    assert report.affected > 0
    assert report.notified == report.affected
    assert report.dead_lettered == 0
    assert report.seat_conflicts == 0


async def test_the_demo_on_a_server_that_outlives_it_plays_a_fresh_day_each_time(nats_server: NatsServer) -> None:
    # the last run's streams would replay into the context view, its monitor state hide the
    # disruptions and JetStream drop its message ids as duplicates: the demo deletes them first
    for _ in range(2):
        report = await run_demo(flights=12, passengers=600, seed=5, timeout=60, nats_url=nats_server.url)
        assert report.disruptions > 0
        assert report.notified == report.affected > 0
        assert report.dead_lettered == 0


@pytest.mark.parametrize(
    ("lost", "repeated"),
    [
        (("travel.flight.delayed.", "travel.flight.cancelled."), {"disruptions": 1, "assessments": 0}),
        (("travel.disruption.assessed.",), {"disruptions": 0, "assessments": 1}),
    ],
    ids=["disruption", "assessment"],
)
async def test_a_disruption_or_assessment_published_again_after_a_lost_ack_is_counted_once(
    lost: tuple[str, ...], repeated: dict[str, int], messages_server: MessagesServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The storm day with the LLM reasoner, under load: a PubAck that comes too late makes the publisher
    # store the message again with the same Nats-Msg-Id (Bus.publish_durable). JetStream keeps one copy;
    # the demo's core subscriptions see both. Counted twice, the demo waited for an assessment (or for
    # the notices of passengers counted twice) that would never come. Here the first ack is lost.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", messages_server.url)
    monkeypatch.setenv("BUSAGENTS_LLM_MAX_RETRIES", "0")
    messages_server.auto(lambda request: stand_in.answer(messages_server, request))
    store = Bus._store  # one JetStream publish of Bus.publish_durable, acknowledged
    lost_acks: list[str] = []

    async def ack_lost_once(self: Bus, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        await store(self, subject, payload, headers)
        if not lost_acks and subject.startswith(lost) and _affects_someone(subject, payload):
            lost_acks.append(subject)
            raise nats.errors.TimeoutError  # stored, but the publisher does not know it

    monkeypatch.setattr(Bus, "_store", ack_lost_once)
    report = await run_demo(flights=40, passengers=3000, seed=11, reasoner="anthropic", timeout=60)
    assert len(lost_acks) == 1
    assert report.repeated == repeated
    assert report.notified == report.affected > 0
    assert report.dead_lettered == 0 and report.seat_conflicts == 0


def _affects_someone(subject: str, payload: bytes) -> bool:
    """A disruption, or the assessment of one that affects passengers (a copy of one that affects
    nobody would add nobody to wait for)."""
    if not subject.startswith("travel.disruption.assessed."):
        return True
    return msgspec.json.decode(payload, type=DisruptionAssessed).affected_passengers > 0
