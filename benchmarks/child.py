"""Benchmark child processes: receivers and responders, one variant per process.

``python -m benchmarks.child ROLE VARIANT --url URL ...`` prints ``READY`` once
subscribed, then one ``RESULT {json}`` line, and exits. One process per variant
and repetition keeps the variants from sharing imports, caches or garbage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats

from busagents import Agent, Bus, Context, Worker, on
from busagents.contract import Durability, contract_info
from busagents.durable import consumer_config, stream_name

from .contracts import DurableStatus, FlightLookup, FlightStatus, LookupFlight, flight_status, status_fields

STATUS_SUBJECT = "bench.flight.status.*"
QUEUE = "bench-sink"
#: Durable consumers (deleted by the benchmark after each run, so each run reads the whole stream).
DURABLE_CONSUMER = "bench-durable-sink"
RAW_DURABLE_CONSUMER = "bench-durable-raw"
#: The raw responder's subject: both responders run at once, so requests can alternate.
RAW_LOOKUP_SUBJECT = "bench.raw.lookup"
#: The same client-side pending limits for every variant (busagents' Mailbox defaults).
PENDING_MSGS = 512 * 1024
PENDING_BYTES = 256 * 1024 * 1024


class Clock:
    """Counts handled messages; times the ``count`` that follow the ``warmup`` ones."""

    def __init__(self, warmup: int, count: int) -> None:
        if warmup < 1 or count < 1:
            raise ValueError("warmup and count must be >= 1")
        self.handled = 0
        self._start_at = warmup
        self._end_at = warmup + count
        self.started = 0.0
        self.ended = 0.0
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.handled += 1
        if self.handled == self._start_at:
            self.started = time.perf_counter()
        elif self.handled == self._end_at:
            self.ended = time.perf_counter()
            self.done.set()


class Sink(Agent):
    """The typed receiver: one handler of FlightStatus, doing what the other variants do."""

    name = QUEUE

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    @on(FlightStatus)
    async def seen(self, status: FlightStatus, ctx: Context) -> None:
        self.clock.tick()


class DurableSink(Agent):
    """The typed durable receiver: the worker pulls, decodes, handles and acks."""

    name = DURABLE_CONSUMER

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    @on(DurableStatus)
    async def seen(self, status: DurableStatus, ctx: Context) -> None:
        self.clock.tick()


class Responder(Agent):
    name = "bench-responder"

    def __init__(self) -> None:
        self.reply = FlightLookup(status=flight_status(0))

    @on(LookupFlight)
    async def lookup(self, q: LookupFlight, ctx: Context) -> FlightLookup:
        return self.reply


Stop = Callable[[], Awaitable[None]]


async def _busagents_receiver(url: str, clock: Clock) -> Stop:
    bus = await Bus.connect(url, name="bench-busagents")
    worker = Worker([Sink(clock)], bus)
    await worker.start()

    async def stop() -> None:
        await worker.drain()
        await bus.close()

    return stop


async def _busagents_stock_headers_receiver(url: str, clock: Clock) -> Stop:
    """As busagents, but on a plain nats-py client: its own header parser instead of busagents'."""
    bus = Bus(await nats.connect(url, name="bench-busagents-stock"))
    worker = Worker([Sink(clock)], bus)
    await worker.start()

    async def stop() -> None:
        await worker.drain()
        await bus.close()

    return stop


async def _natspy_receiver(url: str, clock: Clock) -> Stop:
    nc = await nats.connect(url, name="bench-nats-py")
    decode = msgspec.json.Decoder(FlightStatus).decode
    tick = clock.tick

    async def cb(msg: Any) -> None:
        decode(msg.data)
        tick()

    await nc.subscribe(
        STATUS_SUBJECT, queue=QUEUE, cb=cb, pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES
    )
    await nc.flush()
    return nc.close


async def _faststream_receiver(url: str, clock: Clock) -> Stop:
    from faststream.nats import NatsBroker
    from pydantic import create_model

    model: Any = create_model("FlightStatusModel", **status_fields())
    broker = NatsBroker(url, logger=None)
    tick = clock.tick

    @broker.subscriber(STATUS_SUBJECT, queue=QUEUE, pending_msgs_limit=PENDING_MSGS, pending_bytes_limit=PENDING_BYTES)
    async def seen(status: model) -> None:
        tick()

    await broker.start()
    await broker.connection.flush()
    return broker.stop


async def _busagents_durable(url: str, clock: Clock) -> Stop:
    bus = await Bus.connect(url, name="bench-busagents")
    worker = Worker([DurableSink(clock)], bus)
    await worker.start()

    async def stop() -> None:
        await worker.drain()
        await bus.close()

    return stop


async def _natspy_durable(url: str, clock: Clock) -> Stop:
    """The raw pull loop: fetch a batch, decode, ack each, with the same consumer config as busagents'."""
    nc = await nats.connect(url, name="bench-nats-py")
    js = nc.jetstream()
    info = contract_info(DurableStatus)
    d = info.durability or Durability()
    stream = stream_name(info, d)
    await js.add_consumer(stream, consumer_config(RAW_DURABLE_CONSUMER, info.subscribe_subject, d))
    psub = await js.pull_subscribe_bind(durable=RAW_DURABLE_CONSUMER, stream=stream)
    decode = msgspec.json.Decoder(DurableStatus).decode
    tick = clock.tick

    async def loop() -> None:
        while True:
            try:
                msgs = await psub.fetch(d.batch, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                decode(msg.data)
                tick()
                await msg.ack()

    task = asyncio.create_task(loop())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await nc.close()

    return stop


async def _busagents_responder(url: str) -> Stop:
    bus = await Bus.connect(url, name="bench-busagents")
    worker = Worker([Responder()], bus)
    await worker.start()

    async def stop() -> None:
        await worker.drain()
        await bus.close()

    return stop


async def _natspy_responder(url: str) -> Stop:
    nc = await nats.connect(url, name="bench-nats-py")
    decode = msgspec.json.Decoder(LookupFlight).decode
    encode = msgspec.json.Encoder().encode
    reply = FlightLookup(status=flight_status(0))

    async def cb(msg: Any) -> None:
        decode(msg.data)
        await msg.respond(encode(reply))

    await nc.subscribe(RAW_LOOKUP_SUBJECT, queue="bench-responder", cb=cb)
    await nc.flush()
    return nc.close


RECEIVERS: dict[str, Callable[[str, Clock], Awaitable[Stop]]] = {
    "busagents": _busagents_receiver,
    "busagents-stock-headers": _busagents_stock_headers_receiver,
    "nats-py": _natspy_receiver,
    "faststream": _faststream_receiver,
}
DURABLE_RECEIVERS: dict[str, Callable[[str, Clock], Awaitable[Stop]]] = {
    "busagents": _busagents_durable,
    "nats-py": _natspy_durable,
}
RESPONDERS: dict[str, Callable[[str], Awaitable[Stop]]] = {
    "busagents": _busagents_responder,
    "nats-py": _natspy_responder,
}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def receive_timeout(messages: int) -> float:
    """How long a receiver waits for all its messages before it reports how many came (20 s + 1 ms each).

    Far above any run here (100,000 take 2 to 5 s), and well under the smoke test's own timeout at its
    tiny counts, so a lost message fails with the receiver's count and stderr, not a silent hang.
    """
    return 20.0 + messages / 1000


async def _receive(
    receivers: dict[str, Callable[[str, Clock], Awaitable[Stop]]],
    variant: str,
    url: str,
    warmup: int,
    count: int,
    timeout: float,
) -> dict[str, Any]:
    clock = Clock(warmup, count)
    stop = await receivers[variant](url, clock)
    _say("READY")
    try:
        await asyncio.wait_for(clock.done.wait(), timeout)
    except TimeoutError:
        return {"error": f"received {clock.handled} of {warmup + count} within {timeout:g}s", "short": True}
    finally:
        await stop()
    seconds = clock.ended - clock.started
    return {"count": count, "seconds": seconds, "rate": count / seconds}


async def _respond(variant: str, url: str) -> dict[str, Any]:
    stop = await RESPONDERS[variant](url)
    _say("READY")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # the parent closes stdin to stop us
    await stop()
    return {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    parser.add_argument("role", choices=["receive", "consume", "respond"])
    parser.add_argument("variant")
    parser.add_argument("--url", required=True)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=None, help="default: receive_timeout(warmup + count)")
    args = parser.parse_args(argv)
    if args.role in ("receive", "consume"):
        receivers = RECEIVERS if args.role == "receive" else DURABLE_RECEIVERS
        timeout = args.timeout or receive_timeout(args.warmup + args.count)
        result = asyncio.run(_receive(receivers, args.variant, args.url, args.warmup, args.count, timeout))
    else:
        result = asyncio.run(_respond(args.variant, args.url))
    _say("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
