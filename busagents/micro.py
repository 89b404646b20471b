"""The NATS services protocol for every agent instance: ``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``.

Each agent in a :class:`~busagents.Worker` (so each replica process) answers the three verbs,
and their ``.<agent>`` and ``.<agent>.<instance id>`` forms, with the JSON nats-py's
``nats.micro`` sends (``io.nats.micro.v1.*_response``, built with its own classes), so the NATS
CLI's ``nats micro ls`` lists a busagents swarm and ``busagents ps`` reads it.

The endpoints are the contracts the agent consumes (subject, queue group, per-endpoint
requests, errors and processing time, counted around the worker's handler) and produces
(listed with ``direction: produces``; publishes are not counted per contract). We answer the
protocol here rather than through ``nats.micro.Service``: its endpoints subscribe their
subjects themselves, and the agent's traffic must reach the worker's subscriptions only once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    DEFAULT_PREFIX,
    INFO_RESPONSE_TYPE,
    PING_RESPONSE_TYPE,
    SEMVER_REGEX,
    STATS_RESPONSE_TYPE,
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)

from .contract import ContractInfo, contract_info
from .durable import stream_name
from .envelope import new_id

if TYPE_CHECKING:
    from nats.aio.client import Client

    from .agent import Agent, Handler
    from .bus import Bus

__all__ = ["AgentService", "EndpointCounters", "discover", "service_subjects"]

log = logging.getLogger("busagents.micro")

T = TypeVar("T")

_NOT_A_NAME = re.compile(r"[^A-Za-z0-9_\-]")


def service_subjects(agent_name: str) -> list[str]:
    """The subjects an instance of ``agent_name`` listens on (for its NATS permissions)."""
    out = []
    for verb in ServiceVerb:
        out += [control_subject(verb), control_subject(verb, agent_name), f"{control_subject(verb, agent_name)}.*"]
    return out


@dataclass(slots=True)
class EndpointCounters:
    """One endpoint of an agent instance: what it is, and what its handler did so far."""

    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str]
    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0  # nanoseconds
    handled: int = 0
    dead_lettered: int = 0
    retried: int = 0
    last_error: str = ""
    last_ns: int = 0  # time.perf_counter_ns() when the last message was done with

    def info(self) -> EndpointInfo:
        return EndpointInfo(self.name, self.subject, self.queue_group, dict(self.metadata))

    def stats(self, now_ns: int, wall: float) -> EndpointStats:
        average = self.processing_time // self.num_requests if self.num_requests else 0
        data: dict[str, Any] = {
            "handled": self.handled,
            "dead_lettered": self.dead_lettered,
            "retried": self.retried,
            "last_handled": wall - (now_ns - self.last_ns) / 1e9 if self.last_ns else None,
        }
        return EndpointStats(
            self.name,
            self.subject,
            self.queue_group,
            self.num_requests,
            self.num_errors,
            self.processing_time,
            average,
            last_error=self.last_error,
            data=data,
        )


class AgentService:
    """The services-protocol face of one agent instance in a worker."""

    def __init__(self, agent: Agent, bus: Bus, *, metadata: dict[str, str] | None = None) -> None:
        self.agent = agent
        self.bus = bus
        self.id = new_id()
        self.version = _version(agent)
        self.metadata = {
            "busagents.agent": agent.name,
            "busagents.host": socket.gethostname(),
            "busagents.pid": str(os.getpid()),
            **(metadata or {}),
        }
        self.endpoints: list[EndpointCounters] = []
        self._by_handler: dict[str, EndpointCounters] = {}
        self._subscriptions: list[Subscription] = []
        self._started = datetime.now(UTC).replace(tzinfo=None)
        for contract in type(agent).produces:
            self._add(contract_info(contract), "produces", contract_info(contract).subscribe_subject, "", {})

    def counted(self, handler: Handler, handle: Callable[[Msg], Awaitable[T]]) -> Callable[[Msg], Awaitable[T]]:
        """``handle`` (a worker's handler, returning an :class:`~busagents.worker.Outcome`), counted per endpoint."""
        from .worker import Outcome  # the worker imports this module

        ep = self._endpoint(handler)
        perf = time.perf_counter_ns
        handled = Outcome.HANDLED
        dead = Outcome.DEAD_LETTERED

        async def handle_counted(msg: Msg) -> T:
            started = perf()
            try:
                outcome = await handle(msg)
            except Exception as exc:
                ep.num_errors += 1
                ep.last_error = f"{type(exc).__name__}: {exc}"[:500]
                raise
            finally:
                ended = perf()
                ep.num_requests += 1
                ep.processing_time += ended - started
                ep.last_ns = ended
            if outcome is handled:
                ep.handled += 1
            else:
                ep.num_errors += 1
                if outcome is dead:
                    ep.dead_lettered += 1
                else:
                    ep.retried += 1
            return outcome

        return handle_counted

    def dead_lettered_in(self, stream: str) -> None:
        """Count a message of ``stream`` that JetStream gave up on (a max-deliveries advisory)."""
        for ep in self.endpoints:
            if ep.metadata.get("delivery") == "durable" and ep.metadata.get("stream") == stream:
                ep.num_errors += 1
                ep.dead_lettered += 1
                ep.last_error = "max deliveries reached without an ack"
                return

    def _endpoint(self, handler: Handler) -> EndpointCounters:
        ep = self._by_handler.get(handler.attr)
        if ep is not None:
            return ep
        info = handler.contract
        subject = handler.subject or info.subscribe_subject
        extra: dict[str, str] = {}
        queue = self.agent.name
        if handler.view:
            extra = {"delivery": "view", "stream": stream_name(info, self.bus.durability(info, handler.durability))}
            queue = ""  # every replica reads every message
        elif handler.durable:
            d = self.bus.durability(info, handler.durability)
            consumers = (
                [f"{self.agent.name}-p{p}" for p in range(d.ordered_partitions)]
                if d.ordered_partitions
                else [self.agent.name]
            )
            extra = {"delivery": "durable", "stream": stream_name(info, d), "consumer": ",".join(consumers)}
        else:
            extra = {"delivery": "core"}
        ep = self._add(info, "consumes", subject, queue, extra)
        self._by_handler[handler.attr] = ep
        return ep

    def _add(
        self, info: ContractInfo, direction: str, subject: str, queue: str, extra: dict[str, str]
    ) -> EndpointCounters:
        metadata = {
            "contract": info.name,
            "version": str(info.version),
            "kind": info.kind.value,
            "direction": direction,
            **extra,
        }
        name = _NOT_A_NAME.sub("_", info.name) or "endpoint"
        ep = EndpointCounters(name, subject, queue, metadata)
        self.endpoints.append(ep)
        return ep

    # The protocol

    def ping(self) -> dict[str, Any]:
        return ServicePing(self.id, self.agent.name, self.version, dict(self.metadata)).to_dict()

    def info(self) -> dict[str, Any]:
        return ServiceInfo(
            name=self.agent.name,
            id=self.id,
            version=self.version,
            description=_description(self.agent),
            endpoints=[ep.info() for ep in self.endpoints],
            metadata=dict(self.metadata),
        ).to_dict()

    def stats(self) -> dict[str, Any]:
        now_ns, wall = time.perf_counter_ns(), time.time()
        return ServiceStats(
            id=self.id,
            name=self.agent.name,
            version=self.version,
            started=self._started,
            endpoints=[ep.stats(now_ns, wall) for ep in self.endpoints],
            metadata=dict(self.metadata),
        ).to_dict()

    async def start(self, nc: Client) -> None:
        """Answer the protocol on ``nc`` (the worker calls it once its handlers are subscribed)."""
        answers: dict[ServiceVerb, Callable[[], dict[str, Any]]] = {
            ServiceVerb.PING: self.ping,
            ServiceVerb.INFO: self.info,
            ServiceVerb.STATS: self.stats,
        }
        for verb, answer in answers.items():
            for subject in (
                control_subject(verb, prefix=DEFAULT_PREFIX),
                control_subject(verb, self.agent.name, prefix=DEFAULT_PREFIX),
                control_subject(verb, self.agent.name, self.id, prefix=DEFAULT_PREFIX),
            ):
                self._subscriptions.append(await nc.subscribe(subject, cb=_responder(nc, answer)))

    async def stop(self) -> None:
        """Stop answering: a draining instance is no longer listed."""
        for sub in self._subscriptions:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:  # closed or reconnecting: nothing more will be answered anyway
                log.debug("%s: could not unsubscribe %s: %r", self.agent.name, sub.subject, exc)
        self._subscriptions.clear()


def _responder(nc: Client, answer: Callable[[], dict[str, Any]]) -> Callable[[Msg], Awaitable[None]]:
    async def respond(msg: Msg) -> None:
        if msg.reply:
            await nc.publish(msg.reply, json.dumps(answer()).encode())

    return respond


def _version(agent: Agent) -> str:
    """The agent class's ``version`` when it is semantic, else its distribution's, else busagents'."""
    declared = getattr(type(agent), "version", None)
    if isinstance(declared, str) and SEMVER_REGEX.match(declared):
        return declared
    package = type(agent).__module__.split(".", 1)[0]
    for candidate in (package, package.replace("_", "-"), "busagents"):
        try:
            found = dist_version(candidate)
        except PackageNotFoundError:
            continue
        if SEMVER_REGEX.match(found):
            return found
    return "0.0.0"


def _description(agent: Agent) -> str:
    doc = (type(agent).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


async def discover(
    nc: Client, verb: ServiceVerb, name: str | None = None, *, timeout: float = 1.0, settle: float = 0.25
) -> list[dict[str, Any]]:
    """Every instance's answer to one ``$SRV`` request (of the service ``name``, or of all).

    Waits up to ``timeout`` for the first answer, then until no more came for ``settle``
    seconds: an instance that is gone simply does not answer. Answers that are not JSON
    objects of the verb's response type are left out (another service's bug is not ours).
    """
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    arrived = asyncio.Event()
    kind = _RESPONSE_TYPES[verb]

    async def collect(msg: Msg) -> None:
        try:
            answer = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("type") == kind:
            answers.append(answer)
            arrived.set()

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(control_subject(verb, name), b"", reply=inbox)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout + 10 * settle):  # a bound even if answers keep coming
                while True:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), settle if answers else timeout)
                    except TimeoutError:
                        break
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return answers


_RESPONSE_TYPES = {
    ServiceVerb.PING: PING_RESPONSE_TYPE,
    ServiceVerb.INFO: INFO_RESPONSE_TYPE,
    ServiceVerb.STATS: STATS_RESPONSE_TYPE,
}
