"""Durable consumption: a busagents durable handler vs a raw nats-py pull-consumer loop, same stream."""

from __future__ import annotations

import asyncio
import contextlib
from statistics import median

import nats.js.errors

from busagents import Bus
from busagents.contract import contract_info

from .child import DURABLE_CONSUMER, RAW_DURABLE_CONSUMER
from .contracts import DurableStatus, durable_status
from .loadgen import Blaster, encode_messages
from .proc import spawn
from .report import Check, Result, ratios

NAME = "Durable consumption"
LABELS = {
    "busagents": "busagents durable handler (pull, decode, handle, ack)",
    "nats-py": "raw nats-py pull loop: fetch(256), msgspec decode, msg.ack()",
}

METHOD = """\
**Durable consumption.** The JetStream stream of the durable contract `DurableStatus` (the
same ~{size}-byte status with envelope headers, file storage, created from the contract's
declaration) is filled once with {total:,} messages; then each variant, in a fresh process,
consumes the whole stream from the start through its own new durable pull consumer with the
same configuration (`busagents.durable.consumer_config`: explicit acks, max ack pending
1,000; batches of {batch}), and is deleted afterwards. busagents = a `Worker` running an agent
with `@on(DurableStatus)`: its pull loop (8 lanes, a new pull when half a batch is left),
typed decode, handler, then `+ACK` after the handler returned; nats-py =
`js.pull_subscribe_bind` and a loop of `await psub.fetch({batch})`, msgspec decode,
`await msg.ack()`. Both ack without waiting for a confirmation. The receiver times from the
last of {warmup:,} warm-up messages to the last of {count:,} measured messages handled. The raw
loop is the documented nats-py pattern; it is slow because nats-py's `fetch` waits for each
message of a batch with its own `next_msg(timeout)` and asks for the next batch only when the
previous one was handled, where busagents' consumer reads the subscription's queue directly
and asks for more while it still has half a batch to handle."""


async def _fill(url: str, bus: Bus, stream: str, total: int) -> None:
    await bus.js.purge_stream(stream)
    frames = encode_messages(durable_status(i) for i in range(total))
    blaster = await Blaster.connect(url)
    try:
        await blaster.publish(frames)
    finally:
        await blaster.close()
    stored = 0
    async with asyncio.timeout(120):  # the server stores what it read: ask until it has all
        while stored < total:
            stored = (await bus.js.stream_info(stream)).state.messages


async def _forget_consumers(bus: Bus, stream: str) -> None:
    for name in (DURABLE_CONSUMER, RAW_DURABLE_CONSUMER):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bus.js.delete_consumer(stream, name)


async def run(url: str, *, count: int, warmup: int, reps: int) -> tuple[list[Result], list[Check], str]:
    bus = await Bus.connect(url, name="bench-durable")
    samples: dict[str, list[float]] = {v: [] for v in LABELS}
    try:
        stream = await bus.ensure_stream(DurableStatus)
        await _fill(url, bus, stream, warmup + count)
        variants = list(LABELS)
        for rep in range(reps):
            for variant in variants[rep % 2 :] + variants[: rep % 2]:
                await _forget_consumers(bus, stream)
                child = await spawn(
                    "-m", "benchmarks.child", "consume", variant, "--url", url,
                    "--warmup", str(warmup), "--count", str(count),
                )  # fmt: skip
                await child.ready()
                samples[variant].append((await child.result())["rate"])
        await _forget_consumers(bus, stream)
        await bus.js.delete_stream(stream)
    finally:
        await bus.close()
    base = samples["nats-py"]
    results = [Result(NAME, LABELS[v], "msgs/s", samples[v], ratio=median(ratios(samples[v], base))) for v in LABELS]
    checks = [
        Check(
            "Durable handler throughput / raw pull loop", median(ratios(samples["busagents"], base)), 0.8, at_least=True
        )
    ]
    info = contract_info(DurableStatus)
    batch = info.durability.batch if info.durability else 256
    size = len(encode_messages([durable_status(0)])[0])
    return results, checks, METHOD.format(size=size, total=warmup + count, batch=batch, warmup=warmup, count=count)
