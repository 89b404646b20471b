"""Request/reply latency: a typed Query (Bus.request -> agent) vs raw nats-py ``nc.request`` -> callback."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from statistics import median, quantiles

import msgspec
import nats

from busagents import Bus

from .child import RAW_LOOKUP_SUBJECT
from .contracts import FlightLookup, LookupFlight, flight_status
from .proc import spawn
from .report import Check, Result, ratios

NAME = "Request/reply"
LABELS = {
    "busagents": "busagents typed Query: Bus.request -> @on(LookupFlight) agent",
    "nats-py": "raw nats-py: nc.request -> subscribe callback, msgspec",
}
BLOCK = 50

METHOD = """\
**Request/reply latency.** Two responder processes run side by side: busagents (a `Worker`
with an agent whose `@on(LookupFlight)` handler returns a `FlightLookup` reply, with envelope
headers both ways) and raw nats-py (a subscription callback that decodes the query with
msgspec and `msg.respond`s the encoded reply). The benchmark process sends requests one after
the other, alternating blocks of {block} busagents requests (`await bus.request(LookupFlight(...))`,
which returns the decoded, typed reply) and {block} raw ones (`await nc.request(subject,
encoded_query)` then msgspec decoding of the reply), so both see the same machine at the same
moment: {warmup:,} warm-up requests each, then {count:,} measured each. The reply body is {size}
bytes. Each round trip is timed with `perf_counter_ns`; p50 and p99 are taken per repetition
(fresh responder processes each time) and the medians over repetitions reported."""

Send = Callable[[str], Awaitable[None]]


async def _measure(typed: Send, raw: Send, flights: list[str]) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {"busagents": [], "nats-py": []}
    for start in range(0, len(flights), BLOCK):
        for variant, send in (("busagents", typed), ("nats-py", raw)):
            out = latencies[variant]
            for flight in flights[start : start + BLOCK]:
                started = time.perf_counter_ns()
                await send(flight)
                out.append((time.perf_counter_ns() - started) / 1000)
    return latencies


async def _one(url: str, flights: list[str]) -> dict[str, list[float]]:
    responders = [await spawn("-m", "benchmarks.child", "respond", v, "--url", url) for v in LABELS]
    bus = await Bus.connect(url, name="bench-requester")
    nc = await nats.connect(url, name="bench-requester-raw")
    encode = msgspec.json.Encoder().encode
    decode = msgspec.json.Decoder(FlightLookup).decode

    async def typed(flight: str) -> None:
        await bus.request(LookupFlight(flight_id=flight), timeout=5.0)

    async def raw(flight: str) -> None:
        msg = await nc.request(RAW_LOOKUP_SUBJECT, encode(LookupFlight(flight_id=flight)), timeout=5.0)
        decode(msg.data)

    try:
        for responder in responders:
            await responder.ready()
        return await _measure(typed, raw, flights)
    finally:
        await bus.close()
        await nc.close()
        for responder in responders:
            await responder.close_stdin()
            await responder.result()


async def run(url: str, *, count: int, warmup: int, reps: int) -> tuple[list[Result], list[Check], str]:
    p50: dict[str, list[float]] = {v: [] for v in LABELS}
    p99: dict[str, list[float]] = {v: [] for v in LABELS}
    flights = [f"BA{100 + i % 100}" for i in range(warmup + count)]
    for _ in range(reps):
        for variant, latencies in (await _one(url, flights)).items():
            cuts = quantiles(latencies[warmup:], n=100, method="inclusive")
            p50[variant].append(cuts[49])
            p99[variant].append(cuts[98])
    results = []
    for v in LABELS:
        for metric, samples in (("p50 µs", p50), ("p99 µs", p99)):
            ratio = median(ratios(samples[v], samples["nats-py"]))
            results.append(Result(NAME, LABELS[v], metric, samples[v], higher_is_better=False, ratio=ratio))
    p50_ratio = median(ratios(p50["busagents"], p50["nats-py"]))
    checks = [Check("Typed request p50 / raw nc.request p50", p50_ratio, 1.2, at_least=False)]
    size = len(msgspec.json.encode(FlightLookup(status=flight_status(0))))
    return results, checks, METHOD.format(block=BLOCK, count=count, warmup=warmup, size=size)
