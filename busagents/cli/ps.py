"""``busagents ps``: the running agents and their instances, as they answer the NATS services protocol.

Nothing here comes from a supervisor's memory: ``$SRV.STATS`` and ``$SRV.INFO`` are broadcast,
every live instance answers (see :mod:`busagents.micro`), and the JetStream consumers of the
durable handlers give the lag. An instance that died does not answer, so it is not listed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import nats.errors
import nats.js.errors
from nats.micro.service import ServiceVerb
from rich.console import Console
from rich.table import Table

from ..bus import Bus
from ..errors import ConfigError
from ..micro import discover
from ._nats import nats_option, nats_url

__all__ = ["AgentStatus", "InstanceStatus", "ps_command", "swarm_status"]


@dataclass(slots=True)
class InstanceStatus:
    """One agent instance, from its ``$SRV.STATS`` answer."""

    id: str
    host: str
    pid: int | None
    version: str
    started: str
    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    retried: int = 0
    last_handled: float | None = None


@dataclass(slots=True)
class AgentStatus:
    """An agent type: its live instances, their totals and the lag of its durable consumers."""

    agent: str
    instances: list[InstanceStatus] = field(default_factory=list)
    #: Messages waiting for the agent's durable consumers (pending + delivered but not acked); None: none.
    lag: int | None = None

    @property
    def handled(self) -> int:
        return sum(i.handled for i in self.instances)

    @property
    def failed(self) -> int:
        return sum(i.failed for i in self.instances)

    @property
    def dead_lettered(self) -> int:
        return sum(i.dead_lettered for i in self.instances)

    @property
    def last_handled(self) -> float | None:
        return max((i.last_handled for i in self.instances if i.last_handled is not None), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "replicas": len(self.instances),
            "handled": self.handled,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
            "lag": self.lag,
            "last_handled": self.last_handled,
            "instances": [asdict(i) for i in self.instances],
        }


async def swarm_status(bus: Bus, *, timeout: float = 1.0) -> list[AgentStatus]:
    """Every agent that answers ``$SRV.STATS`` now, by name, with its consumers' lag."""
    stats, infos = await asyncio.gather(
        discover(bus.nc, ServiceVerb.STATS, timeout=timeout), discover(bus.nc, ServiceVerb.INFO, timeout=timeout)
    )
    agents: dict[str, AgentStatus] = {}
    for answer in stats:
        name = str(answer.get("name", ""))
        agents.setdefault(name, AgentStatus(name)).instances.append(_instance(answer))
    consumers: dict[str, set[tuple[str, str]]] = {}
    for info in infos:
        for endpoint in info.get("endpoints") or []:
            meta = endpoint.get("metadata") or {}
            if meta.get("delivery") == "durable" and meta.get("stream") and meta.get("consumer"):
                for consumer in str(meta["consumer"]).split(","):
                    consumers.setdefault(str(info.get("name")), set()).add((str(meta["stream"]), consumer))
    for name, pairs in consumers.items():
        if name in agents:
            agents[name].lag = await _lag(bus, pairs)
    for status in agents.values():
        status.instances.sort(key=lambda i: i.started)
    return [agents[name] for name in sorted(agents)]


def _instance(answer: dict[str, Any]) -> InstanceStatus:
    meta = answer.get("metadata") or {}
    pid = meta.get("busagents.pid")
    out = InstanceStatus(
        id=str(answer.get("id", "")),
        host=str(meta.get("busagents.host", "")),
        pid=int(pid) if isinstance(pid, str) and pid.isdigit() else None,
        version=str(answer.get("version", "")),
        started=str(answer.get("started", "")),
    )
    for endpoint in answer.get("endpoints") or []:
        data = endpoint.get("data") or {}
        if not isinstance(data, dict):
            continue  # a service that is not busagents: its endpoints count nothing we know
        out.handled += int(data.get("handled") or 0)
        out.dead_lettered += int(data.get("dead_lettered") or 0)
        out.retried += int(data.get("retried") or 0)
        out.failed += int(endpoint.get("num_errors") or 0)
        last = data.get("last_handled")
        if isinstance(last, int | float) and (out.last_handled is None or last > out.last_handled):
            out.last_handled = float(last)
    return out


async def _lag(bus: Bus, consumers: set[tuple[str, str]]) -> int | None:
    total: int | None = None
    for stream, consumer in sorted(consumers):
        try:
            info = await bus.js.consumer_info(stream, consumer)
        except (nats.errors.Error, nats.js.errors.Error):
            continue  # deleted meanwhile, or no JetStream: no lag to show
        total = (total or 0) + (info.num_pending or 0) + (info.num_ack_pending or 0)
    return total


@click.command("ps")
@nats_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document: a list of agents with their instances.")
@click.option(
    "--wait",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.05, 60),
    help="Seconds to wait for the first answer.",
)
def ps_command(nats: str | None, as_json: bool, wait: float) -> None:
    """List the running agents and their instances (from the NATS services protocol).

    Per agent: replicas, messages handled, failed (dead-lettered or retried), dead-lettered,
    the lag of its durable consumers (pending + unacknowledged), and when it last handled one.
    """
    with nats_url(nats) as url:  # a swarm runs on a real server, never embedded

        async def main() -> list[AgentStatus]:
            bus = await Bus.connect(url, name="busagents-ps")
            try:
                return await swarm_status(bus, timeout=wait)
            finally:
                await bus.close()

        try:
            agents = asyncio.run(main())
        except TimeoutError:
            raise ConfigError(f"NATS at {url} did not answer") from None
    if as_json:
        click.echo(json.dumps([a.as_dict() for a in agents], indent=2))
        return
    if not agents:
        click.echo(f"no agents answer on {url}")
        return
    Console().print(_table(agents))


def _table(agents: list[AgentStatus]) -> Table:
    table = Table(title="busagents ps", title_justify="left")
    for column in ("agent / instance", "replicas", "handled", "failed", "dead-lettered", "lag", "last handled"):
        table.add_column(column, justify="left" if column.startswith("agent") else "right")
    now = time.time()
    for a in agents:
        lag = "-" if a.lag is None else str(a.lag)
        table.add_row(
            f"[bold]{a.agent}[/]",
            str(len(a.instances)),
            str(a.handled),
            str(a.failed),
            str(a.dead_lettered),
            lag,
            _ago(a.last_handled, now),
        )
        for i in a.instances:
            where = f"{i.host}:{i.pid}" if i.pid is not None else i.id  # the instance id is in --json
            table.add_row(
                f"  {where}",
                "",
                str(i.handled),
                str(i.failed),
                str(i.dead_lettered),
                "",
                _ago(i.last_handled, now),
            )
    return table


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, now - when)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
