"""Request/reply latency: a typed Query (Bus.request -> agent) vs raw nats-py ``nc.request`` -> callback."""

from __future__ import annotations

import time
from statistics import median, quantiles

import msgspec
import nats

from busagents import Bus

from .contracts import FlightLookup, LookupFlight, flight_status
from .proc import spawn
from .report import Check, Result, ratios

NAME = "Request/reply"
LABELS = {
    "busagents": "busagents typed Query: Bus.request -> @on(LookupFlight) agent",
    "nats-py": "raw nats-py: nc.request -> subscribe callback, msgspec",
}

METHOD = """\
**Request/reply latency.** A responder process (busagents: a `Worker` with an agent whose
`@on(LookupFlight)` handler returns a `FlightLookup` reply; nats-py: a subscription callback
that decodes the query with msgspec and `msg.respond`s the encoded reply) and a requester
in the benchmark process that sends {count:,} requests one after the other after {warmup:,}
warm-up requests (busagents: `await bus.request(LookupFlight(...))`, which returns the
decoded, typed reply; nats-py: `await nc.request(subject, encoded_query)` then msgspec
decoding of the reply). The query is a flight id, the reply a {size}-byte body. Each
round trip is timed with `perf_counter_ns`; p50 and p99 are taken per repetition and the
medians over repetitions reported."""


async def _typed(url: str, flights: list[str]) -> list[float]:
    bus = await Bus.connect(url, name="bench-requester")
    latencies = []
    try:
        for flight in flights:
            started = time.perf_counter_ns()
            await bus.request(LookupFlight(flight_id=flight), timeout=5.0)
            latencies.append((time.perf_counter_ns() - started) / 1000)
    finally:
        await bus.close()
    return latencies


async def _raw(url: str, flights: list[str]) -> list[float]:
    nc = await nats.connect(url, name="bench-requester")
    encode = msgspec.json.Encoder().encode
    decode = msgspec.json.Decoder(FlightLookup).decode
    latencies = []
    try:
        for flight in flights:
            started = time.perf_counter_ns()
            msg = await nc.request("bench.flight.lookup", encode(LookupFlight(flight_id=flight)), timeout=5.0)
            decode(msg.data)
            latencies.append((time.perf_counter_ns() - started) / 1000)
    finally:
        await nc.close()
    return latencies


REQUESTERS = {"busagents": _typed, "nats-py": _raw}


async def run(url: str, *, count: int, warmup: int, reps: int) -> tuple[list[Result], list[Check], str]:
    p50: dict[str, list[float]] = {v: [] for v in LABELS}
    p99: dict[str, list[float]] = {v: [] for v in LABELS}
    flights = [f"BA{100 + i % 100}" for i in range(warmup + count)]
    variants = list(LABELS)
    for rep in range(reps):
        for variant in variants[rep % 2 :] + variants[: rep % 2]:
            responder = await spawn("-m", "benchmarks.child", "respond", variant, "--url", url)
            try:
                await responder.ready()
                latencies = (await REQUESTERS[variant](url, flights))[warmup:]
            finally:
                await responder.close_stdin()
                await responder.result()
            cuts = quantiles(latencies, n=100, method="inclusive")
            p50[variant].append(cuts[49])
            p99[variant].append(cuts[98])
    results = []
    for v in variants:
        for metric, samples in (("p50 µs", p50), ("p99 µs", p99)):
            ratio = median(ratios(samples[v], samples["nats-py"]))
            results.append(Result(NAME, LABELS[v], metric, samples[v], higher_is_better=False, ratio=ratio))
    p50_ratio = median(ratios(p50["busagents"], p50["nats-py"]))
    checks = [Check("Typed request p50 / raw nc.request p50", p50_ratio, 1.2, at_least=False)]
    size = len(msgspec.json.encode(FlightLookup(status=flight_status(0))))
    return results, checks, METHOD.format(count=count, warmup=warmup, size=size)
