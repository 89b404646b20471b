"""Event throughput: one publisher, one receiver; busagents typed handler vs raw nats-py vs FastStream."""

from __future__ import annotations

import importlib.util
import sys
import time
from statistics import median

from .contracts import flight_status
from .loadgen import Blaster, encode_messages
from .proc import ShortReceive, spawn
from .report import Check, Result, ratios

NAME = "Event throughput"
LABELS = {
    "busagents": "busagents typed handler (msgspec Struct)",
    "busagents-stock-headers": "busagents typed handler, nats-py's header parser",
    "nats-py": "raw nats-py callback + msgspec decode",
    "faststream": "FastStream subscriber + pydantic model",
}

METHOD = """\
**Event throughput.** One publisher, one receiver process, one subscription in a queue group.
The publisher (`benchmarks/loadgen.py`) writes pre-encoded `HPUB` frames on a raw socket in
batches of 2,000, so every variant receives the very same bytes: a `FlightStatus` JSON body of
{size} bytes plus the envelope headers busagents sends (message id, contract, version,
conversation id, sender, sent-at; {hsize} bytes), on 100 subjects `bench.flight.status.<flight>`.
The publisher's own rate is in the table: it is not the bottleneck. Each receiver runs in a
fresh process and turns every message into a typed object, then counts it:
busagents = a `Worker` running an `Agent` with `@on(FlightStatus)` (8 lanes, contract and
version header checks, typed decode, a `Context`), on busagents' connection, which parses
header blocks with `busagents/headers.py`; "nats-py's header parser" = the same agent on a plain
`nats.connect()` client, to show what that parser is worth; nats-py = `nc.subscribe(cb=...)`
with `msgspec.json.Decoder(FlightStatus)`; FastStream = `NatsBroker(logger=None)` with
`@broker.subscriber` typed by the equivalent pydantic model. All use the same pending limits
(512k messages / 256 MiB). The receiver times, with `perf_counter`, from the last of
{warmup:,} warm-up messages to the last of {count:,} measured messages handled: msgs/s =
{count:,} / that time. Within a repetition the variants run one after the other, in an order
that rotates between repetitions."""


def faststream_installed() -> bool:
    return importlib.util.find_spec("faststream") is not None


async def run(
    url: str, *, count: int, warmup: int, reps: int, faststream: bool = True
) -> tuple[list[Result], list[Check], str]:
    """Run every variant ``reps`` times; ``faststream=False`` leaves FastStream out (smoke tests)."""
    frames = encode_messages(flight_status(i) for i in range(warmup + count))
    _, _, header_bytes, total_bytes = frames[0].split(b"\r\n", 1)[0].split()
    hsize = int(header_bytes)
    size = int(total_bytes) - hsize
    variants = [v for v in LABELS if faststream or v != "faststream"]
    samples: dict[str, list[float]] = {v: [] for v in variants}
    publisher: list[float] = []
    blaster = await Blaster.connect(url)
    try:
        for rep in range(reps):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            slowest = float("inf")
            for variant in order:
                for attempt in (1, 2):
                    child = await spawn(
                        "-m", "benchmarks.child", "receive", variant, "--url", url,
                        "--warmup", str(warmup), "--count", str(count),
                    )  # fmt: skip
                    await child.ready()
                    started = time.perf_counter()
                    await blaster.publish(frames)
                    slowest = min(slowest, len(frames) / (time.perf_counter() - started))
                    try:
                        samples[variant].append((await child.result())["rate"])
                        break
                    except ShortReceive as short:
                        # Core NATS gives no delivery guarantee: under a heavy load a receiver can miss
                        # messages. Said on stderr and run once more; a second shortfall fails the run.
                        if attempt == 2:
                            raise
                        print(f"throughput: {variant}: {short}; running it once more", file=sys.stderr)
            publisher.append(slowest)
    finally:
        await blaster.close()
    base = samples["nats-py"]
    results = [Result(NAME, LABELS[v], "msgs/s", samples[v], ratio=median(ratios(samples[v], base))) for v in variants]
    results.append(
        Result(NAME, "the publisher, its slowest run of the repetition", "msgs/s", publisher, note="reference")
    )
    vs_raw = median(ratios(samples["busagents"], base))
    checks = [Check("Typed handler throughput / raw nats-py + msgspec", vs_raw, 0.85, at_least=True)]
    if faststream:
        vs_fs = median(ratios(samples["busagents"], samples["faststream"]))
        checks.append(Check("Typed handler throughput / FastStream + pydantic", vs_fs, 5.0, at_least=True))
    return results, checks, METHOD.format(size=size, hsize=hsize, warmup=warmup, count=count)
