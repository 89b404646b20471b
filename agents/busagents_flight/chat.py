"""The chat channel: a web page where a traveller talks to the assistant over the bus.

:class:`ChatGateway` is a small aiohttp server (one self-contained page, no CDN, and a
WebSocket per open page). A question typed on the page becomes a :class:`PassengerAsked`
(conversation ``chat-<passenger_id>``, the envelope's conversation id set), and the page
receives, live, the :class:`PassengerAnswered` of that conversation and the
:class:`PassengerNotified` of that passenger (the proactive notices of a disruption), in one
thread. aiohttp, because it serves the page and the WebSocket on the asyncio loop the bus
already runs on, with no second framework or server process.

``busagents demo --chat`` runs it beside the demo day; ``busagents run flight-chat`` (the
:class:`ChatAgent`) runs it against a running swarm. It listens on 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from importlib import resources
from typing import Any

import msgspec
from aiohttp import WSMsgType, web
from busagents_travel import PassengerAnswered, PassengerAsked, PassengerNotified
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from busagents import Agent, Bus, Context
from busagents.contract import contract_info
from busagents.envelope import SENT_AT
from busagents.errors import ConfigError

from .data import AirlineDay, generate
from .feed import status_feed

__all__ = ["ChatAgent", "ChatGateway", "ChatSettings", "affected_passengers", "conversation_of"]

log = logging.getLogger("busagents_flight.chat")

#: A passenger id as the page may send it: it becomes a subject token, so no dots, spaces or wildcards.
_PASSENGER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The longest question the gateway publishes (characters).
MAX_QUESTION = 2000
_SENDER = "flight-chat"


def conversation_of(passenger_id: str) -> str:
    """A passenger's chat conversation id."""
    return f"chat-{passenger_id}"


def affected_passengers(day: AirlineDay, limit: int = 8) -> list[tuple[str, str]]:
    """(passenger id, what happens to their flight) for a few passengers whose first flight the
    day's status feed cancels or delays (cancelled first): the passengers worth talking to in the demo."""
    disrupted: dict[str, str] = {}
    for update in status_feed(day):
        if update.status == "cancelled":
            disrupted[update.flight_id] = f"{update.number} {update.origin}->{update.destination} is cancelled"
        elif update.status == "delayed" and update.flight_id not in disrupted:
            disrupted[update.flight_id] = f"{update.number} {update.origin}->{update.destination} is delayed"
    firsts = [(b, b.legs[0].flight_id) for b in day.bookings if b.legs and b.legs[0].flight_id in disrupted]
    firsts.sort(key=lambda pair: "cancelled" not in disrupted[pair[1]])
    picks = [(b.passengers[0].passenger_id, f"{b.passengers[0].name}: {disrupted[f]}") for b, f in firsts[:limit]]
    return picks


class ChatSettings(BaseSettings):
    """``BUSAGENTS_FLIGHT_CHAT_*``: where ``busagents run flight-chat`` serves the page."""

    model_config = SettingsConfigDict(env_prefix="BUSAGENTS_FLIGHT_CHAT_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8350, ge=0, le=65535)


class ChatGateway:
    """The chat page and its WebSockets, on ``bus``; ``async with`` serves it until the block ends."""

    def __init__(
        self,
        bus: Bus,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        passengers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.bus = bus
        self.host = host
        self.port = port
        self.passengers = passengers or []  # (id, what happens to them): suggestions shown on the page
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    @property
    def url(self) -> str:
        """The page's address (after start: with the port the server got)."""
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/passengers", self._passengers)
        app.router.add_get("/ws", self._socket)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"the chat page cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]  # the bound port, when 0 asked for a free one
        return self.url

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ChatGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _page(self, request: web.Request) -> web.Response:
        html = resources.files(__package__).joinpath("chat.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _passengers(self, request: web.Request) -> web.Response:
        return web.json_response([{"passenger_id": pid, "about": about} for pid, about in self.passengers])

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        passenger_id = request.query.get("passenger", "")
        if not _PASSENGER_ID.match(passenger_id):
            raise web.HTTPBadRequest(text="passenger: 1-64 letters, digits, '_' or '-'")
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            async with _Thread(self.bus, ws, passenger_id) as thread:
                async for frame in ws:
                    if frame.type == WSMsgType.TEXT:
                        await thread.ask(frame.data)
        finally:
            self._sockets.discard(ws)
        return ws


class _Thread:
    """One open page: the passenger's answers and notices forwarded to it, its questions published."""

    def __init__(self, bus: Bus, ws: web.WebSocketResponse, passenger_id: str) -> None:
        self.bus = bus
        self.ws = ws
        self.passenger_id = passenger_id
        self.conversation_id = conversation_of(passenger_id)
        self._subs: list[Subscription] = []
        self._answer = msgspec.json.Decoder(PassengerAnswered).decode
        self._notice = msgspec.json.Decoder(PassengerNotified).decode

    async def __aenter__(self) -> _Thread:
        answered = contract_info(PassengerAnswered).subject
        notified = contract_info(PassengerNotified).subject
        self._subs = [
            await self.bus.nc.subscribe(f"{answered}.{self.conversation_id}", cb=self._on_answer),
            await self.bus.nc.subscribe(f"{notified}.{self.passenger_id}", cb=self._on_notice),
        ]
        await self.bus.nc.flush()
        await self._send({"kind": "ready", "passenger_id": self.passenger_id, "conversation_id": self.conversation_id})
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def ask(self, data: str) -> None:
        try:
            text = str(json.loads(data).get("text", "")).strip()
        except (ValueError, AttributeError):
            await self._send({"kind": "error", "text": 'not a question: send {"text": ...}'})
            return
        if not text:
            return
        if len(text) > MAX_QUESTION:
            await self._send({"kind": "error", "text": f"a question is at most {MAX_QUESTION} characters"})
            return
        question = PassengerAsked(
            question_id=uuid.uuid4().hex,
            conversation_id=self.conversation_id,
            passenger_id=self.passenger_id,
            text=text,
        )
        try:
            envelope = await self.bus.publish(question, sender=_SENDER, conversation_id=self.conversation_id)
        except Exception as exc:  # the bus is down or refused it: the traveller should know
            log.warning("could not publish the question of %s: %r", self.passenger_id, exc)
            await self._send({"kind": "error", "text": f"the question could not be sent: {exc}"})
            return
        await self._send(
            {"kind": "asked", "question_id": question.question_id, "text": text, "at": envelope.sent_at_ns // 1_000_000}
        )

    async def _on_answer(self, msg: Msg) -> None:
        try:
            answer = self._answer(msg.data)
        except msgspec.ValidationError as exc:
            log.warning("an answer on %s that is not a PassengerAnswered: %s", msg.subject, exc)
            return
        await self._send({"kind": "answer", "at": _at(msg), **msgspec.to_builtins(answer)})

    async def _on_notice(self, msg: Msg) -> None:
        try:
            notice = self._notice(msg.data)
        except msgspec.ValidationError as exc:
            log.warning("a notice on %s that is not a PassengerNotified: %s", msg.subject, exc)
            return
        await self._send({"kind": "notice", "at": _at(msg), **msgspec.to_builtins(notice)})

    async def _send(self, frame: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError):
            await self.ws.send_str(json.dumps(frame))


def _at(msg: Msg) -> int:
    """When the message was sent, epoch milliseconds (now, when its envelope does not say)."""
    sent = (msg.headers or {}).get(SENT_AT, "")
    return int(sent) // 1_000_000 if sent.isdigit() else int(time.time() * 1000)


class ChatAgent(Agent):
    """``busagents run flight-chat``: the chat page (``BUSAGENTS_FLIGHT_CHAT_HOST``/``_PORT``) for a
    running swarm; its suggestions are affected passengers of the seeded day (``BUSAGENTS_FLIGHT_*``)."""

    name = "flight-chat"
    produces = (PassengerAsked,)
    singleton = True  # one page server on one port

    async def run(self, ctx: Context) -> None:
        from .settings import FlightSettings

        chat, flight = ChatSettings(), FlightSettings()
        day = generate(flight.flights, flight.passengers, flight.seed)
        gateway = ChatGateway(ctx.bus, host=chat.host, port=chat.port, passengers=affected_passengers(day))
        async with gateway:
            ctx.log.info("chat page on %s", gateway.url)
            print(f"chat: {gateway.url}", flush=True)
            await asyncio.Event().wait()  # until the worker drains (cancelled)
