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
from collections import OrderedDict, deque
from importlib import resources
from typing import Any

import msgspec
import nats.errors
from aiohttp import WSMsgType, web
from busagents_travel import PassengerAnswered, PassengerAsked, PassengerNotified
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from busagents import Agent, Bus, Context
from busagents.contract import contract_info
from busagents.envelope import SENT_AT
from busagents.errors import BusagentsError, ConfigError

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
    """The chat page and its WebSockets, on ``bus``; ``async with`` serves it until the block ends.

    It keeps the last :data:`HISTORY` messages of each passenger's thread (questions, answers and
    notices, for at most :data:`THREADS` passengers) so a page opened or reloaded later shows the
    notices that came before it.
    """

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
        self._subs: list[Subscription] = []
        self._threads: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._pages: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self._answer = msgspec.json.Decoder(PassengerAnswered).decode
        self._notice = msgspec.json.Decoder(PassengerNotified).decode

    @property
    def url(self) -> str:
        """The page's address (after start: with the port the server got)."""
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> str:
        """Subscribe to the passengers' answers and notices, then serve the page; its URL."""
        self._subs = [
            await self.bus.nc.subscribe(contract_info(PassengerAnswered).subscribe_subject, cb=self._on_answer),
            await self.bus.nc.subscribe(contract_info(PassengerNotified).subscribe_subject, cb=self._on_notice),
        ]
        await self.bus.nc.flush()
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/passengers", self._passengers)
        app.router.add_get("/ws", self._socket)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            await self._unsubscribe()
            raise ConfigError(f"the chat page cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]  # the bound port, when 0 asked for a free one
        return self.url

    async def stop(self) -> None:
        for pages in self._pages.values():
            for queue in pages:
                queue.put_nowait(None)  # each page's socket closes
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs = []

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
        outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=_PAGE_QUEUE)
        outbox.put_nowait(
            {"kind": "ready", "passenger_id": passenger_id, "conversation_id": conversation_of(passenger_id)}
        )
        for frame in self._threads.get(passenger_id, ()):  # then live: nothing can come between
            outbox.put_nowait(frame)
        pages = self._pages.setdefault(passenger_id, set())
        pages.add(outbox)
        try:
            async with asyncio.TaskGroup() as tasks:
                sender = tasks.create_task(_forward(outbox, ws), name=f"chat:{passenger_id}:send")
                async for incoming in ws:
                    if incoming.type == WSMsgType.TEXT:
                        await self._ask(passenger_id, incoming.data, outbox)
                sender.cancel()
        finally:
            pages.discard(outbox)
            if not pages:
                self._pages.pop(passenger_id, None)
        return ws

    async def _ask(self, passenger_id: str, data: str, outbox: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Publish the page's question as a PassengerAsked."""
        try:
            text = str(json.loads(data).get("text", "")).strip()
        except (ValueError, AttributeError):
            _offer(outbox, {"kind": "error", "text": 'not a question: send {"text": ...}'})
            return
        if not text:
            return
        if len(text) > MAX_QUESTION:
            _offer(outbox, {"kind": "error", "text": f"a question is at most {MAX_QUESTION} characters"})
            return
        conversation_id = conversation_of(passenger_id)
        question = PassengerAsked(
            question_id=uuid.uuid4().hex, conversation_id=conversation_id, passenger_id=passenger_id, text=text
        )
        try:
            envelope = await self.bus.publish(question, sender=_SENDER, conversation_id=conversation_id)
        except (BusagentsError, nats.errors.Error) as exc:  # the bus is down or refused it: the traveller should know
            log.warning("could not publish the question of %s: %s", passenger_id, exc)
            _offer(outbox, {"kind": "error", "text": f"the question could not be sent: {exc}"})
            return
        at = envelope.sent_at_ns // 1_000_000
        self._deliver(passenger_id, {"kind": "asked", "question_id": question.question_id, "text": text, "at": at})

    async def _on_answer(self, msg: Msg) -> None:
        try:
            answer = self._answer(msg.data)
        except msgspec.ValidationError as exc:
            log.warning("an answer on %s that is not a PassengerAnswered: %s", msg.subject, exc)
            return
        if answer.conversation_id == conversation_of(answer.passenger_id):  # the chat's, not another channel's
            self._deliver(answer.passenger_id, {"kind": "answer", "at": _at(msg), **msgspec.to_builtins(answer)})

    async def _on_notice(self, msg: Msg) -> None:
        try:
            notice = self._notice(msg.data)
        except msgspec.ValidationError as exc:
            log.warning("a notice on %s that is not a PassengerNotified: %s", msg.subject, exc)
            return
        self._deliver(notice.passenger_id, {"kind": "notice", "at": _at(msg), **msgspec.to_builtins(notice)})

    def _deliver(self, passenger_id: str, frame: dict[str, Any]) -> None:
        """Keep ``frame`` in the passenger's thread and send it to each page open on it."""
        thread = self._threads.get(passenger_id)
        if thread is None:
            thread = self._threads[passenger_id] = deque(maxlen=HISTORY)
            if len(self._threads) > THREADS:
                self._threads.popitem(last=False)
        else:
            self._threads.move_to_end(passenger_id)
        thread.append(frame)
        for outbox in self._pages.get(passenger_id, ()):
            _offer(outbox, frame)


#: Messages kept per passenger's thread, and passengers whose threads are kept (the least recent go first).
HISTORY, THREADS = 50, 20_000
#: Frames waiting for one page's socket; a page that falls that far behind misses the newest.
_PAGE_QUEUE = 256


def _offer(outbox: asyncio.Queue[dict[str, Any] | None], frame: dict[str, Any]) -> None:
    try:
        outbox.put_nowait(frame)
    except asyncio.QueueFull:
        log.warning("a chat page is %d messages behind: dropped one", _PAGE_QUEUE)


async def _forward(outbox: asyncio.Queue[dict[str, Any] | None], ws: web.WebSocketResponse) -> None:
    """Send a page its frames in order; close its socket when the gateway stops (None)."""
    while (frame := await outbox.get()) is not None:
        if ws.closed:
            return
        with contextlib.suppress(ConnectionError):
            await ws.send_str(json.dumps(frame))
    await ws.close()


def _at(msg: Msg) -> int:
    """When the message was sent, epoch milliseconds (now, when its envelope does not say)."""
    sent = (msg.headers or {}).get(SENT_AT, "")
    return int(sent) // 1_000_000 if sent.isdigit() else int(time.time() * 1000)


class ChatAgent(Agent):
    """``busagents run flight-chat``: the chat page (``BUSAGENTS_FLIGHT_CHAT_HOST``/``_PORT``) for a
    running swarm; its suggestions are affected passengers of the seeded day (``BUSAGENTS_FLIGHT_*``)."""

    name = "flight-chat"
    produces = (PassengerAsked,)
    #: What the gateway's own subscriptions forward to the pages (no handlers): declared, so the swarm
    #: graph shows who reads the answers and a least-privilege swarm lets the gateway subscribe to them.
    awaits = (PassengerAnswered, PassengerNotified)
    singleton = True  # one page server on one port
    interactive = True  # travellers' pages wait on it

    async def run(self, ctx: Context) -> None:
        from .settings import FlightSettings

        chat, flight = ChatSettings(), FlightSettings()
        day = generate(flight.flights, flight.passengers, flight.seed)
        gateway = ChatGateway(ctx.bus, host=chat.host, port=chat.port, passengers=affected_passengers(day))
        async with gateway:
            ctx.log.info("chat page on %s", gateway.url)
            print(f"chat: {gateway.url}", flush=True)
            await asyncio.Event().wait()  # until the worker drains (cancelled)
