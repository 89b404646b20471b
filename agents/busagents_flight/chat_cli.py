"""``busagents chat PASSENGER``: the conversation with the assistant in a terminal.

The terminal channel of the chat page (:mod:`busagents_flight.chat`): each line typed is a
:class:`PassengerAsked` in the passenger's conversation (``chat-<passenger_id>``, channel
``terminal``); the assistant's :class:`PassengerAnswered` and the passenger's proactive notices
(:class:`PassengerNotified`) are printed as they arrive, in one thread. End of input (Ctrl-D)
waits for the answers still due, then ends; Ctrl-C ends at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator

import click
import msgspec
from busagents_travel import PassengerAnswered, PassengerAsked, PassengerNotified
from nats.aio.msg import Msg

from busagents import Bus
from busagents.cli import nats_option, nats_url
from busagents.contract import contract_info

from .chat import _PASSENGER_ID, MAX_QUESTION, conversation_of

__all__ = ["chat_command"]

_SENDER = "flight-chat-terminal"


@click.command("chat")
@click.argument("passenger")
@nats_option
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for an answer still due at the end.")
def chat_command(passenger: str, nats: str | None, wait: float) -> None:
    """Talk to the flight assistant as PASSENGER (a passenger id of the day, e.g. from the demo)."""
    if not _PASSENGER_ID.match(passenger):
        raise click.BadParameter("letters, digits, '-' and '_' only (it is a subject token)", param_hint="PASSENGER")
    with nats_url(nats) as url, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_chat(url, passenger, wait))


async def _chat(url: str, passenger: str, wait: float) -> None:
    conversation = conversation_of(passenger)
    bus = await Bus.connect(url, name=_SENDER)
    due: set[str] = set()  # questions not answered yet
    answered = asyncio.Event()
    answers = msgspec.json.Decoder(PassengerAnswered)
    notices = msgspec.json.Decoder(PassengerNotified)

    async def on_answer(msg: Msg) -> None:
        answer = answers.decode(msg.data)
        if answer.conversation_id != conversation:
            return
        _say(f"assistant: {answer.text}")
        for fact in answer.facts:
            _say(f"    · {fact}")
        if answer.action or answer.outcome:
            _say(f"    [{' '.join(x for x in (answer.action, answer.outcome) if x)}]")
        due.discard(answer.question_id)
        answered.set()

    async def on_notice(msg: Msg) -> None:
        _say(f"notice: {notices.decode(msg.data).text}")

    try:
        subs = [
            await bus.nc.subscribe(f"{contract_info(PassengerAnswered).subject}.{conversation}", cb=on_answer),
            await bus.nc.subscribe(f"{contract_info(PassengerNotified).subject}.{passenger}", cb=on_notice),
        ]
        await bus.flush()
        _say(f"chatting as {passenger} (conversation {conversation}); type a question, Ctrl-D to end")
        async for line in _lines():
            text = line.strip()[:MAX_QUESTION]
            if not text:
                continue
            question = PassengerAsked(
                question_id=uuid.uuid4().hex,
                conversation_id=conversation,
                passenger_id=passenger,
                text=text,
                channel="terminal",
            )
            due.add(question.question_id)
            await bus.publish(question, sender=_SENDER, conversation_id=conversation)
        deadline = time.monotonic() + wait
        while due and (left := deadline - time.monotonic()) > 0:
            answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answered.wait(), left)
        if due:
            _say(f"({len(due)} question(s) not answered within {wait:g}s: is the flight-concierge running?)")
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await bus.close()


async def _lines() -> AsyncIterator[str]:
    """The lines of standard input, read on the event loop (no thread left blocked at the end)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line.decode(errors="replace")


def _say(text: str) -> None:
    click.echo(text)
