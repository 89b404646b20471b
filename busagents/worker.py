"""The worker: runs agents on one bus with bounded concurrency, dead letters and drain.

Each handler of each agent gets a subscription in the queue group named after the
agent, so an event reaches every agent *type* once and the replicas of a type
share the load. A message that cannot be decoded, has the wrong contract or
version, or whose handler raises goes to ``busagents.dlq.<agent>`` with the
reason, the original headers and the original bytes; the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg

from .agent import Agent, Handler
from .bus import ERROR_HEADER, Bus, Mailbox
from .codec import codec_for, encode
from .context import Context
from .contract import Kind, contract_info
from .envelope import CONTRACT, VERSION, Envelope
from .errors import ContractError, DecodeError, UndeclaredContractError

__all__ = [
    "DLQ_AGENT",
    "DLQ_PREFIX",
    "DLQ_REASON",
    "DLQ_STAGE",
    "DLQ_SUBJECT",
    "AgentStats",
    "Worker",
    "dead_letter_subject",
]

log = logging.getLogger("busagents.worker")

DLQ_PREFIX = "busagents.dlq"
DLQ_REASON = "Ba-Dlq-Reason"
DLQ_SUBJECT = "Ba-Dlq-Subject"
DLQ_AGENT = "Ba-Dlq-Agent"
DLQ_STAGE = "Ba-Dlq-Stage"  # decode | contract | version | handler | reply
STATS_PREFIX = "busagents.stats"


def dead_letter_subject(agent_name: str) -> str:
    return f"{DLQ_PREFIX}.{agent_name}"


@dataclass(slots=True)
class AgentStats:
    """Counters of one agent in one worker."""

    agent: str
    handled: int = 0
    dead_lettered: int = 0
    published: int = 0
    in_flight: int = 0


class Worker:
    """Runs agents in this process on one bus. Use ``async with Worker(...)`` or :meth:`serve`."""

    def __init__(
        self,
        agents: Sequence[Agent],
        bus: Bus,
        *,
        drain_timeout: float = 30.0,
        heartbeat_interval: float = 0.0,
    ) -> None:
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ContractError(f"agent names must be unique in one worker, got {names}")
        self.agents = list(agents)
        self.bus = bus
        self.drain_timeout = drain_timeout
        self.heartbeat_interval = heartbeat_interval
        self.stats = {a.name: AgentStats(a.name) for a in agents}
        self._mailboxes: list[Mailbox] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = asyncio.Event()

    # Lifecycle

    async def start(self) -> None:
        """Start every agent, then subscribe its handlers and start its ``run`` loop."""
        if self._started:
            return
        self._started = True
        for agent in self.agents:
            await agent.on_start(self._root_context(agent))
        for agent in self.agents:
            for handler in type(agent).handlers.values():
                subject = handler.subject or handler.contract.subscribe_subject
                handle = self._handler(agent, handler)
                if self.bus.telemetry is not None:
                    handle = self.bus.telemetry.traced_handle(
                        handle,
                        agent=agent.name,
                        contract=handler.contract.name,
                        template=handler.contract.subscribe_subject,
                        stats=self.stats[agent.name],
                    )
                self._mailboxes.append(
                    await self.bus.mailbox(subject, handle, queue=agent.name, lanes=agent.max_concurrency)
                )
            if type(agent).run is not Agent.run:
                self._tasks.append(asyncio.create_task(self._run_loop(agent), name=f"run:{agent.name}"))
        if self.heartbeat_interval > 0:
            self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        await self.bus.flush()
        log.info("worker started: %s", ", ".join(a.name for a in self.agents))

    async def drain(self) -> bool:
        """Stop taking new work, finish what is in flight, then stop the agents.

        Returns False when in-flight work did not finish within ``drain_timeout``.
        """
        if not self._started or self._stopped.is_set():
            return True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        results = await asyncio.gather(*(m.drain(self.drain_timeout) for m in self._mailboxes))
        for agent in self.agents:
            try:
                await agent.on_stop(self._root_context(agent))
            except Exception:
                log.exception("agent %s failed in on_stop", agent.name)
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.bus.flush()
        self._stopped.set()
        log.info("worker drained")
        return all(results)

    async def serve(self, stop: asyncio.Event | None = None) -> bool:
        """Start, run until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass
        try:
            await self.start()
            await stop.wait()
            log.info("stop requested: draining")
            return await self.drain()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain()

    # Internals

    def _root_context(self, agent: Agent) -> Context:
        return Context(agent, self.bus, logging.getLogger(f"busagents.agent.{agent.name}"))

    async def _run_loop(self, agent: Agent) -> None:
        try:
            await agent.run(self._root_context(agent))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent %s: run() failed; its handlers keep serving", agent.name)

    async def _heartbeat(self) -> None:
        encoder = msgspec.json.Encoder()
        instance = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            for stats in self.stats.values():
                payload = {**asdict(stats), "instance": instance, "time": time.time()}
                with contextlib.suppress(nats.errors.Error):
                    await self.bus.nc.publish(f"{STATS_PREFIX}.{stats.agent}", encoder.encode(payload))
            await asyncio.sleep(self.heartbeat_interval)

    def _handler(self, agent: Agent, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        info = handler.contract
        decode = codec_for(info.cls).decode
        func: Callable[[Any, Context], Awaitable[Any]] = getattr(agent, handler.attr)
        name = info.name
        version = str(info.version)
        reply_cls = info.reply if info.kind is Kind.QUERY else None
        bus = self.bus
        logger = logging.getLogger(f"busagents.agent.{agent.name}")
        stats = self.stats[agent.name]
        dead_letter = self._dead_letter
        emit = self._emit

        async def handle(msg: Msg) -> None:
            headers = msg.headers
            if headers is not None:
                sent_contract = headers.get(CONTRACT)
                if sent_contract is not None and sent_contract != name:
                    await dead_letter(agent, msg, "contract", f"expected contract {name}, got {sent_contract}")
                    return
                sent_version = headers.get(VERSION)
                if sent_version is not None and sent_version != version:
                    await dead_letter(
                        agent,
                        msg,
                        "version",
                        f"{name}: this agent handles version {version}, got {sent_version}",
                    )
                    return
            try:
                body = decode(msg.data)
            except DecodeError as exc:
                await dead_letter(agent, msg, "decode", str(exc))
                return
            ctx = Context(agent, bus, logger, headers if headers is not None else {}, msg.subject)
            stats.in_flight += 1
            try:
                result = await func(body, ctx)
                if reply_cls is not None:
                    await _reply(bus, agent, msg, ctx, result, reply_cls)
                elif result is not None:
                    stats.published += await emit(agent, ctx, result)
            except Exception as exc:
                await dead_letter(agent, msg, "handler", f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, (UndeclaredContractError, ContractError)):
                    logger.warning("handler %s failed on %s: %r", handler.attr, msg.subject, exc)
                return
            finally:
                stats.in_flight -= 1
            stats.handled += 1

        return handle

    async def _emit(self, agent: Agent, ctx: Context, result: Any) -> int:
        messages = result if isinstance(result, (list, tuple)) else (result,)
        for message in messages:  # check them all before anything leaves the process
            ctx._check(message)
            if contract_info(type(message)).kind is Kind.QUERY:
                raise ContractError(f"a handler cannot return the query {type(message).__name__}; use ctx.request")
        for message in messages:
            await ctx.publish(message)
        return len(messages)

    async def _dead_letter(self, agent: Agent, msg: Msg, stage: str, reason: str) -> None:
        self.stats[agent.name].dead_lettered += 1
        reason = " ".join(reason.split())[:2000]  # one header line
        headers = dict(msg.headers or {})
        headers[DLQ_REASON] = reason
        headers[DLQ_SUBJECT] = msg.subject
        headers[DLQ_AGENT] = agent.name
        headers[DLQ_STAGE] = stage
        log.warning("dead letter from %s (%s): %s", agent.name, stage, reason)
        try:
            await self.bus.nc.publish(dead_letter_subject(agent.name), msg.data, headers=headers)
            if msg.reply:
                await self.bus.nc.publish(msg.reply, b"", headers={ERROR_HEADER: reason})
        except nats.errors.Error:
            log.exception("could not publish the dead letter of %s; reason was: %s", agent.name, reason)


async def _reply(bus: Bus, agent: Agent, msg: Msg, ctx: Context, result: Any, reply_cls: type[Any]) -> None:
    if not isinstance(result, reply_cls):
        raise ContractError(f"query handler returned {type(result).__name__}, expected {reply_cls.__name__}")
    if not msg.reply:
        return
    info = contract_info(reply_cls)
    envelope = Envelope.new(info.name, info.version, sender=agent.name, cause=ctx.envelope)
    await bus.nc.publish(msg.reply, encode(result), headers=envelope.to_headers())
