"""What ``swarm up`` scales an autoscaled agent by: the lag of its durable consumers.

The lag is what JetStream holds for the agent and it has not finished: messages pending
(not yet delivered) plus those delivered and not yet acknowledged, summed over the
consumers of its durable handlers (one per handler; one per partition of an ordered
contract). It is read with ``consumer_info``, as ``busagents ps`` and KEDA's NATS
JetStream scaler read it.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors

from ..agent import Agent
from ..bus import Bus
from ..durable import stream_name
from ..plugins import load_agent

__all__ = ["ConsumerLag", "consumer_lag", "durable_consumers"]


def durable_consumers(bus: Bus, agent: type[Agent]) -> list[tuple[str, str]]:
    """(stream, consumer) of each durable handler of ``agent``, as its workers create them."""
    out = []
    for handler in agent.handlers.values():
        if not handler.durable:
            continue
        d = bus.durability(handler.contract, handler.durability)
        stream = bus.stream_name(stream_name(handler.contract, d))
        names = [f"{agent.name}-p{p}" for p in range(d.ordered_partitions)] if d.ordered_partitions else [agent.name]
        out += [(stream, name) for name in names]
    return out


class ConsumerLag:
    """``await lag()``: the agent's lag now, or None while JetStream knows none of its consumers."""

    def __init__(self, bus: Bus, consumers: list[tuple[str, str]]) -> None:
        self.bus = bus
        self.consumers = consumers

    async def __call__(self) -> int | None:
        total: int | None = None
        for stream, consumer in self.consumers:
            try:
                info = await self.bus.js.consumer_info(stream, consumer)
            except (nats.errors.Error, nats.js.errors.Error):
                continue  # not created yet (its agent is starting), or JetStream away for a moment
            total = (total or 0) + (info.num_pending or 0) + (info.num_ack_pending or 0)
        return total

    async def close(self) -> None:
        await self.bus.close()


async def consumer_lag(url: str, target: str) -> ConsumerLag:
    """The lag reader of the agent ``target`` (a plugin name or ``module:Class``) on the NATS at ``url``."""
    bus = await Bus.connect(url, name="swarm-autoscale")
    return ConsumerLag(bus, durable_consumers(bus, load_agent(target)))
