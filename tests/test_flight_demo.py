"""The flight assistant end to end: the demo over a real (embedded) nats-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from busagents_flight.demo import run_demo

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
