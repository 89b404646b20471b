"""The flight swarm scaled out: every agent at 2 replicas as OS processes (``busagents swarm up``),
with and without a SIGKILL of each agent mid-day; the monitor restarted mid-day.

Each test runs its own nats-server. The day is the bundled default (40 flights, 3,000
passengers, seed 7), its feed paced over a few seconds so that kills land mid-day. What
happened is read afterwards from JetStream (disruptions, assessments, decisions,
rejections), the notifier's outbox and the booking store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from busagents_flight.feed import status_feed

from busagents import Bus
from busagents.server import NatsServer

from .flight_swarm import (
    AGENTS,
    DayOutcome,
    SwarmUp,
    check_disruptions,
    expected_status_disruptions,
    flight_env,
    outcome,
    settle,
    swarm_file,
    the_day,
    wait_for_feed,
)

pytestmark = pytest.mark.timeout(240)

DAY, UPDATES = the_day()


async def _run_day(tmp: Path, replicas: int, kill: tuple[str, ...] = (), *, agents: tuple[str, ...] = AGENTS) -> None:
    """Run the day under ``swarm up``; SIGKILL one replica of each agent in ``kill`` once half the feed is stored."""
    env = flight_env(tmp, BUSAGENTS_FLIGHT_DAY_SECONDS="6", BUSAGENTS_ACK_WAIT="3")
    with NatsServer(store_dir=str(tmp / "js")) as server:
        swarm = SwarmUp(swarm_file(tmp / "swarm.toml", replicas, agents=agents), server.url, env, tmp / "swarm.log")
        bus = await Bus.connect(server.url, name="swarm-test")
        try:
            await bus.wait_for_agents((*agents, "flight-feed"), timeout=90)
            if kill:
                await wait_for_feed(bus, UPDATES // 2, timeout=60)
                for agent in kill:
                    swarm.kill_one(agent)
            await settle(bus, UPDATES, timeout=150)
            result = await outcome(bus, tmp, DAY)
        except BaseException:
            print(swarm.output())
            raise
        finally:
            await bus.close()
            code = swarm.stop()
    assert code == 0, swarm.output()
    log = swarm.output()
    for agent in kill:
        assert f"{agent}[0] exited with -9; restarting" in log or f"{agent}[1] exited with -9; restarting" in log
    _check(result)


def _check(result: DayOutcome) -> None:
    print(  # the figures, for `pytest -s`
        f"affected {result.affected}, notified {result.notified}, told twice {result.told_twice}, "
        f"decisions {result.decisions}, re-decided {result.rejected}, seat conflicts {result.seat_conflicts}, "
        f"stranded {result.stranded}, disruptions {len(result.disruptions)}"
    )
    assert result.affected > 200
    assert result.told_twice == 0, f"{result.told_twice} passengers told twice about one disruption"
    assert result.notified == result.affected, result.unserved()
    assert result.seat_conflicts == 0
    assert result.stranded == 0
    assert result.rejected <= result.decisions // 100, f"{result.rejected} re-decisions of {result.decisions}"
    check_disruptions(result.disruptions, DAY)


async def test_every_agent_at_two_replicas_serves_every_passenger_exactly_once(tmp_path: Path) -> None:
    await _run_day(tmp_path, replicas=2)


async def test_every_agent_killed_once_mid_day_is_restarted_and_nobody_is_lost_or_told_twice(tmp_path: Path) -> None:
    await _run_day(tmp_path, replicas=2, kill=(*AGENTS, "flight-feed"))


async def test_a_monitor_restarted_mid_day_announces_every_disruption_once(tmp_path: Path) -> None:
    await _run_day(tmp_path, replicas=1, kill=("flight-monitor",))


def test_ground_truth_sees_the_days_cancellations_and_long_delays() -> None:
    cancelled, long_delays = expected_status_disruptions(status_feed(DAY))
    assert cancelled and long_delays  # the default day has both: the checks above compare against something
