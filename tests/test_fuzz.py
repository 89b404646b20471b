"""Hostile input, fuzzed: bad bytes of every kind, mixed with valid messages, never kill an agent.

Two agents run as ``busagents run`` processes (``tests/fuzz_agents.py``): a core one and a
durable one. Each hypothesis example draws, for each agent, every hostile kind of
:data:`benchmarks.hostile.KINDS` once, in a drawn order, with valid messages between them, and
sends them over plain TCP connections written by hand (what no NATS client would send).
Then :func:`benchmarks.hostile.verify` checks every message: a valid one has its effect and its
output exactly once; a hostile one is dead-lettered with a reason (or handled, where busagents
reads it as valid), or refused at the edge and then left no trace; nothing lands on a reply
subject; and the agent answers a valid message within seconds, its process still running.

``python -m benchmarks.hostile`` runs the same generator at 10,000 messages per agent.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from benchmarks.hostile import (
    CORE,
    DURABLE,
    HOSTILE,
    KINDS,
    Expect,
    Run,
    Sent,
    Target,
    Traffic,
    run_traffic,
    spawn_agent,
    verify,
)
from busagents import Bus
from busagents.dlq import DLQ_DROPPED, DLQ_MSG_ID
from busagents.server import NatsServer

T = TypeVar("T")
TARGETS = (CORE, DURABLE)

#: Where the edge, not the agent, turns a kind away: nats-server closes the raw connection, or
#: JetStream does not store the message (so the durable agent never sees it).
REFUSED = {
    (CORE.name, "over-max-payload"): "Maximum Payload Violation",
    (CORE.name, "long-subject"): "maximum control line exceeded",
    (DURABLE.name, "over-max-payload"): "Maximum Payload Violation",
    (DURABLE.name, "long-subject"): "maximum control line exceeded",
    (DURABLE.name, "huge-conversation-id"): "header size exceeds maximum allowed",  # JetStream: 64 KiB of headers
    (DURABLE.name, "big-header-block"): "header size exceeds maximum allowed",  # at 64 KiB
    (DURABLE.name, "duplicate-id"): "a duplicate",  # the second of the two: JetStream de-duplicates
}
# nats-server may reset the connection before its -ERR is read, for a payload it will not take
_RESET = "connection reset"

_runs = itertools.count(1)


@dataclass
class Agents:
    server: NatsServer
    procs: dict[str, subprocess.Popen[bytes]]
    dbs: dict[str, Path]
    logs: dict[str, Path]
    max_payload: int

    def log_tail(self, name: str, lines: int = 15) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    """nats-server with a store, and the two agents as their own processes, for every example."""
    tmp = tmp_path_factory.mktemp("fuzz")
    server = NatsServer(store_dir=tmp / "nats").start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        dbs = {t.name: tmp / f"{t.name}.db" for t in TARGETS}
        logs = {t.name: tmp / f"{t.name}.log" for t in TARGETS}
        for t in TARGETS:
            procs[t.name] = spawn_agent(t, server.url, dbs[t.name], logs[t.name])
        max_payload = asyncio.run(_ready(server.url))
        yield Agents(server, procs, dbs, logs, max_payload)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.stop()


async def _ready(url: str) -> int:
    bus = await Bus.connect(url, name="fuzz-ready")
    try:
        await bus.wait_for_agents([t.name for t in TARGETS], timeout=60)
        return bus.nc.max_payload
    finally:
        await bus.close()


class _Drawn:
    """The generator's choices, made by hypothesis."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[T]) -> T:
        return self.data.draw(st.sampled_from(options))


def traffic(data: st.DataObject, target: Target, run: str, max_payload: int) -> list[Sent]:
    """Every hostile kind once, in a drawn order, 0 to 2 valid messages before each; then valid ones."""
    draw = _Drawn(data)
    built = Traffic(target, run, max_payload)
    for kind in data.draw(st.permutations(HOSTILE)):
        for _ in range(draw.integer(0, 2)):
            built.add("valid", draw)
        built.add(kind, draw)
    built.add("replay-of-twice", draw)
    built.add("valid", draw)
    return built.messages


async def _send_all(agents: Agents, plans: dict[Target, list[Sent]]) -> list[Run]:
    bus = await Bus.connect(agents.server.url, name="fuzz-test")
    try:
        runs = [run_traffic(bus, t, messages, agents.dbs[t.name], settle=10.0) for t, messages in plans.items()]
        return await asyncio.gather(*runs)
    finally:
        await bus.close()


# Shrinking re-sends whole runs: a failure names each message that went wrong instead.
@settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@seed(14)
@given(data=st.data())
def test_hostile_traffic_is_dead_lettered_or_refused_and_valid_traffic_has_its_effect_exactly_once(
    agents: Agents, data: st.DataObject
) -> None:
    plans = {t: traffic(data, t, f"{next(_runs):06x}", agents.max_payload) for t in TARGETS}
    runs = asyncio.run(_send_all(agents, plans))

    problems = [problem for r in runs for problem in verify(r)]
    for r in runs:
        proc = agents.procs[r.target.name]
        if proc.poll() is not None:
            problems.append(f"{r.target.name} exited with {proc.returncode}:\n{agents.log_tail(r.target.name)}")
        for sent in r.messages:
            if sent.refused is None:
                continue
            allowed = REFUSED.get((r.target.name, sent.kind))
            if allowed is None or (allowed not in sent.refused and _RESET not in sent.refused):
                problems.append(f"{r.target.name} {sent.kind} {sent.marker}: refused at the edge: {sent.refused}")
    if problems:  # hypothesis replays a failing example to report it: say what the first run found
        print("this example:", *problems, sep="\n  ")
    assert not problems, "\n".join(problems[:40])
    for r in runs:
        assert {s.kind for s in r.messages} >= set(KINDS), "a kind was not sent"
        assert r.answered_in is not None  # by the final valid message, within benchmarks.hostile.QUICK


@pytest.mark.parametrize("name", [b"Fo\xc3\xb8", b"Foo bar"], ids=["not-ascii", "with-a-space"])
def test_a_header_name_nats_py_cannot_read_is_named_in_the_dead_letter_as_dropped(agents: Agents, name: bytes) -> None:
    # README: a dead letter keeps headers whose name is a token, and Ba-Dlq-Dropped-Headers names the others.
    # nats-py's header parser drops these names on receipt: busagents never sees them to name them.
    built = Traffic(CORE, f"{next(_runs):06x}", agents.max_payload)
    marker = built.marker()
    block = b"NATS/1.0\r\nNats-Msg-Id: " + marker.encode() + b"-id\r\n" + name + b": 1\r\n\r\n"
    letter = {DLQ_DROPPED: "not a token", DLQ_MSG_ID: f"{marker}-id"}
    built.send(marker, "non-token-header", Expect.DEAD, "decode", b"not json", block=block, letter=letter)

    [run] = asyncio.run(_send_all(agents, {CORE: built.messages}))

    assert verify(run) == []
