"""An agent whose query nobody in its swarm answers (``busagents run asker_agent:Asker``), for the swarm-file tests."""

from __future__ import annotations

import msgspec

from busagents import Agent, Context, event, on, query


class Quote(msgspec.Struct):
    cents: int


@query("test.asker.quote", reply=Quote)
class AskQuote(msgspec.Struct):
    item: str


@event("test.asker.wanted")
class Wanted(msgspec.Struct):
    item: str


class Asker(Agent):
    name = "asker"
    produces = (AskQuote,)

    @on(Wanted)
    async def wanted(self, msg: Wanted, ctx: Context) -> None:
        await ctx.request(AskQuote(item=msg.item))
