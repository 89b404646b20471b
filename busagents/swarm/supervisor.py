"""The supervisor: every replica of every agent as its own OS process, restarted when it dies.

Each replica runs ``python -m busagents run TARGET --nats URL``. A replica that exits
while the swarm is up is restarted with backoff, at most ``max_restarts`` times within
``restart_window`` seconds; stopping the swarm sends SIGTERM to every replica, so each
drains (finishes what is in flight) before it exits. On Linux a replica also gets SIGTERM
when the supervisor itself dies, even by SIGKILL (see :mod:`busagents.process`).

:meth:`Supervisor.run` owns everything it starts: one task per replica in a task group, and
the processes, which get SIGTERM (SIGKILL after ``stop_timeout``) however ``run`` ends,
by ``stop``, by an error or by being cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..process import die_with_parent
from .autoscale import consumer_lag
from .config import AgentSpec, Autoscale, SwarmConfig

__all__ = ["Replica", "Supervisor"]

log = logging.getLogger("busagents.swarm")


@dataclass
class Replica:
    key: str
    index: int
    target: str
    env: dict[str, str]
    restart: bool
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    retiring: bool = False  # asked to drain and stop for good (autoscaled down)
    _recent: deque[float] = field(default_factory=deque)

    @property
    def label(self) -> str:
        return f"{self.key}[{self.index}]"


class Supervisor:
    """Starts, watches and stops the replicas of a swarm."""

    def __init__(
        self,
        config: SwarmConfig,
        nats_url: str,
        *,
        on_event: Callable[[str], None] | None = None,
        stop_timeout: float = 40.0,
        log_level: str | None = None,
        data_dir: Path | None = None,
        capture_output: bool = False,
    ) -> None:
        """``log_level`` becomes each replica's BUSAGENTS_LOG_LEVEL, ``data_dir`` its BUSAGENTS_DATA_DIR
        (where it writes its files), unless its ``env`` sets them. With ``capture_output``, what a
        replica prints comes to ``on_event`` line by line, after its label (a live view owns the terminal).
        """
        self.config = config
        self.nats_url = nats_url
        self.log_level = log_level
        self.data_dir = data_dir
        self.capture_output = capture_output
        self.stop_timeout = stop_timeout
        self._say = on_event or (lambda text: log.info("%s", text))
        self._stopping = False
        self._stopped = asyncio.Event()  # wakes replicas waiting to restart
        targets = config.targets()
        self.replicas = [
            Replica(key, i, targets[key], _replica_env(spec), spec.restart)
            for key, spec in config.agents.items()
            for i in range(spec.initial_replicas)
        ]
        self._keepers: list[asyncio.Task[None]] = []
        self._tasks: asyncio.TaskGroup | None = None

    async def _spawn(self, replica: Replica) -> None:
        level = {"BUSAGENTS_LOG_LEVEL": self.log_level} if self.log_level else {}
        data = {"BUSAGENTS_DATA_DIR": str(self.data_dir)} if self.data_dir is not None else {}
        env = {**os.environ, **level, **data, **replica.env, "BUSAGENTS_NATS_URL": self.nats_url}
        capture = self.capture_output
        replica.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "busagents", "run", replica.target, "--nats", self.nats_url),
            env=env,
            stdout=asyncio.subprocess.PIPE if capture else None,
            stderr=asyncio.subprocess.STDOUT if capture else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only; it forwards SIGTERM once
            preexec_fn=die_with_parent(),  # spawned on the loop's thread: SIGTERM when the supervisor dies
        )
        self._say(f"started {replica.label} pid {replica.process.pid}")

    async def _keep(self, replica: Replica) -> None:
        """Start the replica, and again each time it exits, until the swarm stops or it gives up."""
        while True:
            await self._spawn(replica)
            assert replica.process is not None
            if self._stopping:  # stop came while it was being started: it missed the SIGTERM
                self._terminate(replica)
            relay = asyncio.create_task(self._relay(replica)) if self.capture_output else None
            try:
                code = await replica.process.wait()
            finally:
                if relay is not None:  # the rest of what it printed, unless a child of its own keeps the pipe open
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(relay, 1.0)
            if self._stopping:
                self._say(f"{replica.label} stopped (exit {code})")
                return
            if replica.retiring:  # autoscaled down: it drained and stopped, as asked
                self._say(f"{replica.label} drained and stopped (exit {code}): scaled down")
                self.replicas.remove(replica)
                return
            if not replica.restart:
                self._say(f"{replica.label} exited with {code}; restart is off for it")
                return
            now = time.monotonic()
            replica._recent.append(now)
            while replica._recent and now - replica._recent[0] > self.config.restart_window:
                replica._recent.popleft()
            if len(replica._recent) > self.config.max_restarts:
                self._say(
                    f"{replica.label} exited with {code} {len(replica._recent)} times within "
                    f"{self.config.restart_window:.0f}s; giving up on it"
                )
                return
            backoff = min(5.0, 0.2 * 2 ** (len(replica._recent) - 1))
            self._say(f"{replica.label} exited with {code}; restarting in {backoff:.1f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), backoff)
            if self._stopping:
                return
            replica.restarts += 1

    async def _relay(self, replica: Replica) -> None:
        """Each line the replica prints, to ``on_event`` after its label, until it closes its output."""
        assert replica.process is not None and replica.process.stdout is not None
        async for line in replica.process.stdout:
            self._say(f"{replica.label}: {line.decode(errors='replace').rstrip()}")

    def _live(self) -> list[Replica]:
        return [r for r in self.replicas if r.process is not None and r.process.returncode is None]

    def _terminate(self, replica: Replica) -> None:
        if replica.process is not None and replica.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGTERM)

    def _stop(self) -> None:
        """SIGTERM to every replica; one being started gets it as soon as it exists (see _keep)."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        live = self._live()
        self._say(f"stopping: SIGTERM to {len(live)} replica(s)")
        for replica in live:
            self._terminate(replica)

    def _kill_live(self) -> None:
        for replica in self._live():
            assert replica.process is not None
            self._say(f"{replica.label} did not drain within {self.stop_timeout}s; killing it")
            replica.process.kill()

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the number of replicas that did not exit cleanly."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                keepers = [tasks.create_task(self._keep(r), name=f"watch:{r.label}") for r in self.replicas]
                self._keepers = list(keepers)
                stopped = tasks.create_task(stop.wait(), name="swarm:stop")
                ended = tasks.create_task(asyncio.wait(keepers), name="swarm:ended")  # every replica gave up
                scalers = [
                    tasks.create_task(self._autoscale(key, spec.autoscale), name=f"autoscale:{key}")
                    for key, spec in self.config.agents.items()
                    if spec.autoscale is not None
                ]
                await asyncio.wait([stopped, ended], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                for scaler in scalers:
                    scaler.cancel()
                self._stop()
                _, draining = await asyncio.wait(self._keepers, timeout=self.stop_timeout)
                if draining:
                    self._kill_live()
        finally:
            await self._reap()
        return sum(1 for r in self.replicas if r.process is not None and r.process.returncode not in (0, None))

    # Autoscaling

    def count(self, key: str) -> int:
        """Replicas of the entry ``key`` now (those draining to stop for good not counted)."""
        return sum(1 for r in self.replicas if r.key == key and not r.retiring)

    def _scale_up(self, key: str) -> Replica:
        spec = self.config.agents[key]
        index = max((r.index for r in self.replicas if r.key == key), default=-1) + 1
        replica = Replica(key, index, self.config.targets()[key], _replica_env(spec), spec.restart)
        self.replicas.append(replica)
        assert self._tasks is not None
        self._keepers.append(self._tasks.create_task(self._keep(replica), name=f"watch:{replica.label}"))
        return replica

    def _scale_down(self, key: str) -> Replica | None:
        """SIGTERM to the newest replica of ``key``: it drains (finishes what it holds, gives back the
        rest) and is not restarted."""
        live = [r for r in self.replicas if r.key == key and not r.retiring]
        if not live:
            return None
        replica = max(live, key=lambda r: r.index)
        replica.retiring = True
        self._terminate(replica)
        return replica

    async def _autoscale(self, key: str, rule: Autoscale) -> None:
        """Every ``rule.interval`` s, look at the lag of the agent's durable consumers: ``up_after`` looks
        in a row above ``rule.lag`` add a replica (up to ``max``), ``down_after`` looks in a row below
        half of it take one away (down to ``min``). The hysteresis (a band, and looks in a row) keeps
        it from flapping."""
        try:
            lag_of = await consumer_lag(self.nats_url, self.config.targets()[key])
        except Exception as exc:  # the swarm runs on without it, at the replicas it has
            self._say(f"autoscale {key}: cannot read its lag ({exc}); it keeps {self.count(key)} replica(s)")
            return
        try:
            high = low = 0
            while not self._stopping:
                await asyncio.sleep(rule.interval)
                lag = await lag_of()
                if lag is None:  # no JetStream answer yet (the streams are being created)
                    continue
                high, low = (high + 1, 0) if lag > rule.lag else (0, low + 1 if lag < rule.lag / 2 else 0)
                n = self.count(key)
                if high >= rule.up_after and n < rule.max:
                    replica = self._scale_up(key)
                    self._say(f"autoscale {key}: lag {lag} > {rule.lag}; adding {replica.label} ({n + 1}/{rule.max})")
                    high = 0
                elif low >= rule.down_after and n > rule.min:
                    retired = self._scale_down(key)
                    if retired is not None:
                        self._say(f"autoscale {key}: lag {lag} < {rule.lag // 2}; draining {retired.label} ({n - 1})")
                    low = 0
        finally:
            await lag_of.close()

    async def _reap(self) -> None:
        """After an error or a cancel: stop the replicas still running and wait for them to exit."""
        self._stop()
        live = self._live()
        if not live:
            return
        try:
            waits = (r.process.wait() for r in live if r.process is not None)
            await asyncio.wait_for(asyncio.gather(*waits), self.stop_timeout)
        except TimeoutError:
            pass
        finally:
            self._kill_live()  # cancelled again, or out of time


def _replica_env(spec: AgentSpec) -> dict[str, str]:
    """What a replica's environment adds: its scheduling (see ``BUSAGENTS_SCHEDULING``), its ``env``, shadow mode."""
    return {"BUSAGENTS_SCHEDULING": spec.scheduling, **spec.env, **({"BUSAGENTS_SHADOW": "1"} if spec.shadow else {})}
