"""Fault: a poison message (its handler always raises) among 10,000 good ones.

It is redelivered with backoff until the contract's ``max_deliver`` (3 here), then stored in
the dead-letter stream with its reason and terminated, while the other 9,999 flow through.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from busagents import Bus, NatsServer, Worker
from busagents.dlq import dead_letters

from .fault_ledger import FAST, Credit, Ledger, count_effects, publish_credits, wait_for, wait_settled

N = 10_000
POISON = 4_321


async def test_poison_message_is_dead_lettered_after_max_deliveries_while_the_rest_flows(tmp_path: Path) -> None:
    db = str(tmp_path / "ledger.db")
    started = time.perf_counter()
    with NatsServer() as server:
        bus = await Bus.connect(server.url)
        worker = Worker([Ledger(db)], bus)
        await worker.start()
        try:
            await asyncio.gather(
                publish_credits(bus, (n for n in range(N) if n != POISON)),
                bus.publish(Credit(account="acct-poison", n=POISON, poison=True)),
            )
            await wait_for(lambda: count_effects(db)[1] >= N - 1, 60, f"{N - 1} good effects")
            await wait_settled(bus, "BA_Credit", "ledger", 30)
            letters = await dead_letters(bus, agent="ledger")
            rows, distinct = count_effects(db)
        finally:
            await worker.drain()
            await bus.close()
    elapsed = time.perf_counter() - started
    print(
        f"\npoison: {N} messages, {elapsed:.1f}s; store rows={rows} distinct={distinct}; "
        f"dead letters={[(d.stage, d.deliveries, d.reason) for d in letters]}"
    )
    assert distinct == N - 1 and rows == N - 1, "good messages were lost or applied twice"
    assert len(letters) == 1, f"expected the poison message alone in the DLQ, got {len(letters)}"
    (letter,) = letters
    assert letter.stage == "max-deliveries"
    assert letter.deliveries == FAST.max_deliver
    assert f"poison credit {POISON}" in letter.reason
    assert letter.subject == "faults.credit.acct-poison"
    assert b'"poison":true' in letter.data  # the original bytes
    assert worker.stats["ledger"].dead_lettered == 1
