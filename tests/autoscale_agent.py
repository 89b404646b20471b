"""A durable agent run as real OS processes by the autoscaling test (``tests.autoscale_agent:Cruncher``).

Each job's effect is counted in an SQLite file shared by the replicas (``AUTOSCALE_DB``), then
announced with ``Crunched``: a job handled twice shows as a count of 2.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import msgspec

from busagents import Agent, Context, command, event, on


@command("test.autoscale.job", durable=True)
class Job(msgspec.Struct):
    n: int


@event("test.autoscale.crunched")
class Crunched(msgspec.Struct):
    n: int
    pid: int


class Cruncher(Agent):
    name = "autoscaled"
    produces = (Crunched,)
    max_concurrency = 1  # one job at a time: a replica does about 100 jobs/s

    def __init__(self) -> None:
        self.db = sqlite3.connect(os.environ["AUTOSCALE_DB"], timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS effects (n INTEGER PRIMARY KEY, times INTEGER NOT NULL)")

    @on(Job)
    async def crunch(self, job: Job, ctx: Context) -> Crunched:
        await asyncio.sleep(0.01)  # the work
        self.db.execute("INSERT INTO effects VALUES (?, 1) ON CONFLICT(n) DO UPDATE SET times = times + 1", (job.n,))
        return Crunched(n=job.n, pid=os.getpid())
