"""``busagents publish CONTRACT JSON`` and ``busagents request QUERY JSON``: the bus from a shell."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import msgspec

from ..bus import Bus
from ..codec import codec_for, encode
from ..contract import ContractInfo, Kind, contract_info, subject_for
from ..errors import ConfigError, ContractError, DecodeError, NoResponderError, QueryFailedError
from ..plugins import find_contract
from ..telemetry import configure_from_env
from ..telemetry import shutdown as shutdown_telemetry
from ._nats import nats_option, nats_url

#: ``Ba-Sender`` of what the CLI sends.
SENDER = "busagents-cli"

_body = click.argument("body", metavar="JSON")
_conversation = click.option("--conversation", default=None, help="Join this conversation (default: a new one).")


@click.command("publish")
@click.argument("contract", metavar="CONTRACT")
@_body
@_conversation
@nats_option
def publish_command(contract: str, body: str, conversation: str | None, nats: str | None) -> None:
    """Publish an event or command: CONTRACT by name, JSON its body ('-': read it from stdin).

    The body is validated against the contract before anything is sent; the envelope is filled in
    as an agent's is (message id, contract and version, conversation, sender, send time).
    """
    info, message, subject = _prepare(contract, body)
    if info.kind is Kind.QUERY:
        raise ConfigError(f"{info.name} is a query: send it with 'busagents request {contract} ...'")
    if info.kind is Kind.REPLY:
        raise ConfigError(f"{info.name} is the reply of a query: only the agent answering it sends one")
    with nats_url(nats) as url:
        envelope = asyncio.run(_publish(url, message, conversation))
    click.echo(f"published {info.name} id={envelope.id} subject={subject} conversation={envelope.conversation_id}")


@click.command("request")
@click.argument("query", metavar="QUERY")
@_body
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@_conversation
@nats_option
def request_command(query: str, body: str, timeout: float, conversation: str | None, nats: str | None) -> None:
    """Send the query QUERY with JSON as its body ('-': stdin) and print the typed reply as JSON.

    Exits with 1 when the answering agent failed (its error is printed), nobody answers the
    query's subject, or no reply came within --timeout seconds.
    """
    info, message, subject = _prepare(query, body)
    if info.kind is not Kind.QUERY:
        article = "an" if info.kind is Kind.EVENT else "a"
        raise ConfigError(f"{info.name} is {article} {info.kind.value}, not a query: send it with 'busagents publish'")
    with nats_url(nats) as url:
        try:
            reply = asyncio.run(_request(url, message, timeout, conversation))
        except NoResponderError:
            raise QueryFailedError(f"no responder: no agent answers {info.name} on {subject}") from None
    click.echo(msgspec.json.format(encode(reply), indent=2).decode())


def _prepare(name: str, body: str) -> tuple[ContractInfo, Any, str]:
    """The contract, the validated message and its subject; nothing touches NATS before this passed."""
    cls = find_contract(name)
    info = contract_info(cls)
    text = sys.stdin.read() if body == "-" else body
    try:
        message = codec_for(cls).decode(text.encode())
        subject = subject_for(info, message)
    except (DecodeError, ContractError) as exc:
        raise ConfigError(f"invalid {info.name}, nothing sent: {exc}") from None
    return info, message, subject


async def _connect(url: str) -> Bus:
    return await Bus.connect(url, name=SENDER, telemetry=configure_from_env(service_name=SENDER))


async def _publish(url: str, message: Any, conversation: str | None) -> Any:
    bus = await _connect(url)
    try:
        return await bus.publish(message, sender=SENDER, conversation_id=conversation)
    finally:
        await _close(bus)


async def _request(url: str, message: Any, timeout: float, conversation: str | None) -> Any:
    bus = await _connect(url)
    try:
        return await bus.request(message, timeout=timeout, sender=SENDER, conversation_id=conversation)
    finally:
        await _close(bus)


async def _close(bus: Bus) -> None:
    await bus.close()
    if bus.telemetry is not None:
        shutdown_telemetry()
