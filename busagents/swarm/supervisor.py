"""The supervisor: every replica of every agent as its own OS process, restarted when it dies.

Each replica runs ``python -m busagents run TARGET --nats URL``. A replica that exits
while the swarm is up is restarted with backoff, at most ``max_restarts`` times within
``restart_window`` seconds; stopping the swarm sends SIGTERM to every replica, so each
drains (finishes what is in flight) before it exits. On Linux a replica also gets SIGTERM
when the supervisor itself dies, even by SIGKILL (see ``busagents._proc``).
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

from .._proc import die_with_parent
from .config import SwarmConfig

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
    ) -> None:
        """``log_level`` becomes each replica's BUSAGENTS_LOG_LEVEL unless its ``env`` sets one."""
        self.config = config
        self.nats_url = nats_url
        self.log_level = log_level
        self.stop_timeout = stop_timeout
        self._say = on_event or (lambda text: log.info("%s", text))
        self._stopping = False
        targets = config.targets()
        self.replicas = [
            Replica(key, i, targets[key], spec.env, spec.restart)
            for key, spec in config.agents.items()
            for i in range(spec.replicas)
        ]

    async def _spawn(self, replica: Replica) -> None:
        level = {"BUSAGENTS_LOG_LEVEL": self.log_level} if self.log_level else {}
        env = {**os.environ, **level, **replica.env, "BUSAGENTS_NATS_URL": self.nats_url}
        replica.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "busagents", "run", replica.target, "--nats", self.nats_url),
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only; it forwards SIGTERM once
            preexec_fn=die_with_parent(),  # spawned on the loop's thread: SIGTERM when the supervisor dies
        )
        self._say(f"started {replica.label} pid {replica.process.pid}")

    async def _watch(self, replica: Replica) -> None:
        while True:
            assert replica.process is not None
            code = await replica.process.wait()
            if self._stopping:
                self._say(f"{replica.label} stopped (exit {code})")
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
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            replica.restarts += 1
            await self._spawn(replica)

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set; returns the number of replicas that did not exit cleanly."""
        for replica in self.replicas:
            await self._spawn(replica)
        watchers = [asyncio.create_task(self._watch(r), name=f"watch:{r.label}") for r in self.replicas]
        stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        all_done: asyncio.Future[object] = asyncio.ensure_future(asyncio.gather(*watchers))
        await asyncio.wait([stopped, all_done], return_when=asyncio.FIRST_COMPLETED)
        self._stopping = True
        stopped.cancel()
        for replica in self.replicas:
            if replica.process is not None and replica.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    replica.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(all_done, self.stop_timeout)
        except TimeoutError:
            for replica in self.replicas:
                if replica.process is not None and replica.process.returncode is None:
                    self._say(f"{replica.label} did not drain within {self.stop_timeout}s; killing it")
                    replica.process.kill()
            await asyncio.gather(*watchers, return_exceptions=True)
        return sum(1 for r in self.replicas if r.process is not None and r.process.returncode not in (0, None))
