"""The live status of ``busagents swarm up`` in a terminal: agents, replicas, restarts, handled counts.

Replicas and restarts come from the supervisor; what each agent handled comes from the stats
heartbeats its workers publish on ``busagents.stats.<agent>`` (every ``BUSAGENTS_HEARTBEAT_INTERVAL``
seconds). A replica that was restarted starts counting again; its predecessor's last count is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..agent import Agent
from ..bus import Bus
from ..subjects import STATS_PREFIX
from ..swarm import Supervisor
from ..swarm.supervisor import Replica

__all__ = ["SwarmView"]

log = logging.getLogger("busagents.swarm")


class _Beat(msgspec.Struct):
    agent: str
    instance: str
    handled: int = 0
    in_flight: int = 0
    dead_lettered: int = 0


@dataclass
class _Seen:
    beat: _Beat
    at: float


class SwarmView:
    """Keeps the last heartbeat of every instance and renders one row per swarm entry.

    It owns the terminal while it shows: the supervisor's events and what the replicas print
    (``Supervisor(capture_output=True)``) go through :meth:`say`, above the table.
    """

    def __init__(self, agents: Mapping[str, type[Agent]], console: Console | None = None) -> None:
        self.names = {key: cls.name for key, cls in agents.items()}
        self.console = console or Console()
        self.seen: dict[str, _Seen] = {}  # instance -> its last heartbeat
        self._decode = msgspec.json.Decoder(_Beat).decode
        self._replicas: list[Replica] = []

    def say(self, text: str) -> None:
        """One line above the table."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def beat(self, data: bytes) -> None:
        try:
            beat = self._decode(data)
        except msgspec.DecodeError:
            return  # not a worker's heartbeat: nothing to show
        self.seen[beat.instance] = _Seen(beat, time.monotonic())

    def table(self) -> Table:
        table = Table(title="busagents swarm", title_justify="left")
        for column in ("agent", "replicas", "restarts", "handled", "in flight", "dead letters", "last beat"):
            table.add_column(column, justify="left" if column == "agent" else "right")
        now = time.monotonic()
        for key, name in self.names.items():
            replicas = [r for r in self._replicas if r.key == key]
            running = sum(1 for r in replicas if r.process is not None and r.process.returncode is None)
            seen = [s for s in self.seen.values() if s.beat.agent == name]
            last = f"{now - max(s.at for s in seen):.0f}s ago" if seen else "-"
            table.add_row(
                key if key == name else f"{key} ({name})",
                f"{running}/{len(replicas)}",
                str(sum(r.restarts for r in replicas)),
                str(sum(s.beat.handled for s in seen)),
                str(sum(s.beat.in_flight for s in seen)),
                str(sum(s.beat.dead_lettered for s in seen)),
                last,
            )
        return table

    async def show(self, supervisor: Supervisor, url: str, running: asyncio.Task[int]) -> None:
        """Render until ``running`` (the supervisor's run) ends; a view that cannot connect says so and ends."""
        self._replicas = supervisor.replicas
        try:
            bus = await Bus.connect(url, name="busagents-swarm-view")
        except Exception as exc:
            log.warning("no live status view: %s", exc)
            return
        try:

            async def on_beat(msg: Msg) -> None:
                self.beat(msg.data)

            await bus.nc.subscribe(f"{STATS_PREFIX}.*", cb=on_beat)
            with Live(self.table(), console=self.console, refresh_per_second=2) as live:
                while not running.done():
                    await asyncio.wait({running}, timeout=0.5)
                    live.update(self.table())
        finally:
            await bus.close()
