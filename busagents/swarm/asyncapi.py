"""The AsyncAPI 3.0 document of a swarm: what an agent in another language needs to join it.

Every channel is a contract's subject (a keyed subject has the key as a parameter, read from
the payload); every message carries the envelope headers, those busagents always sends marked
``required``. A query's reply travels on the requester's inbox, the NATS reply subject of the
request: AsyncAPI's runtime expressions reach only a message's headers and payload, so the
reply channel has a ``null`` address (known at runtime) and the operation's reply says where
it comes from in ``x-busagents-reply-to``. Dead letters (``busagents.dlq.<agent>``) have a
channel of their own with their ``Ba-Dlq-*`` headers; ``servers`` comes from the NATS URL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from ..agent import Agent
from ..bus import ERROR_HEADER
from ..contract import ContractInfo, Kind, contract_info
from ..dlq import (
    DLQ_AGENT,
    DLQ_DELIVERIES,
    DLQ_DROPPED,
    DLQ_MSG_ID,
    DLQ_REASON,
    DLQ_STAGE,
    DLQ_STREAM,
    DLQ_SUBJECT,
    DLQ_TRUNCATED,
)
from ..envelope import (
    CAUSATION_ID,
    CONTRACT,
    CONVERSATION_ID,
    MSG_ID,
    REPLAY_OF,
    SENDER,
    SENT_AT,
    TRACEPARENT,
    TRACESTATE,
    VERSION,
)
from ..errors import ConfigError
from ..subjects import DLQ_PREFIX

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["DEAD_LETTERS", "DEFAULT_NATS_URL", "REPLY_TO", "asyncapi_document", "reply_channel"]

#: The server a document names when the swarm gives no NATS URL: the NATS default.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
#: The channel of the dead letters.
DEAD_LETTERS = "dead-letters"
#: Where a query's reply goes (``x-busagents-reply-to`` of an operation's reply).
REPLY_TO = "nats-reply-subject"
_ENVELOPE_REQUIRED = (MSG_ID, CONTRACT, VERSION, CONVERSATION_ID, SENT_AT)
_REPLY_REQUIRED = (*_ENVELOPE_REQUIRED, CAUSATION_ID, SENDER)
_DLQ_REQUIRED = (MSG_ID, DLQ_REASON, DLQ_SUBJECT, DLQ_AGENT, DLQ_STAGE)
_DLQ_STAGES = ["decode", "contract", "version", "handler", "max-deliveries"]


def asyncapi_document(
    graph: Graph, *, title: str = "busagents swarm", version: str = "1.0.0", nats_url: str | None = None
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``graph``: channels, messages and every agent's operations."""
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for info in graph.contracts:
        message = _message(info, _component_schema(info, schemas))
        messages[info.name] = message
        channels[info.name] = _channel(info)
        if info.reply is not None:
            reply = contract_info(info.reply)
            messages[reply.name] = _message(reply, _component_schema(reply, schemas), _REPLY_REQUIRED)
            messages[_error_name(info)] = _error_message(info)
            channels[reply_channel(info)] = _reply_channel(info, reply)
    agents = [agent.name for agent in graph.agents]
    messages["DeadLetter"] = _dead_letter_message()
    channels[DEAD_LETTERS] = _dead_letter_channel(agents)
    operations: dict[str, Any] = {}
    for agent in graph.agents:
        operations.update(_operations(agent))
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Contracts and agents of a busagents swarm. Every message is JSON with its "
            "metadata in NATS headers; an agent in another language joins by sending and reading them.",
        },
        "defaultContentType": "application/json",
        "servers": servers(nats_url),
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def servers(nats_url: str | None) -> dict[str, Any]:
    """The ``servers`` block of a NATS URL (comma-separated for a cluster), credentials left out."""
    out: dict[str, Any] = {}
    for i, url in enumerate(u.strip() for u in (nats_url or DEFAULT_NATS_URL).split(",")):
        if not url:
            continue
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            port = parts.port or 4222
        except ValueError:
            raise ConfigError(f"invalid NATS URL {url!r}: give one like {DEFAULT_NATS_URL}") from None
        if not parts.hostname:
            raise ConfigError(f"invalid NATS URL {url!r}: give one like {DEFAULT_NATS_URL}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        server: dict[str, Any] = {"host": f"{host}:{port}", "protocol": "nats"}
        if parts.scheme == "tls":
            server["description"] = "TLS required (tls:// URL)"
        out["nats" if i == 0 else f"nats-{i + 1}"] = server
    if not out:
        raise ConfigError(f"empty NATS URL: give one like {DEFAULT_NATS_URL}")
    return out


def reply_channel(info: ContractInfo) -> str:
    """The channel of a query's replies."""
    return f"{info.name}-reply"


def _error_name(info: ContractInfo) -> str:
    return f"{info.name}Failed"


def _headers(required: Iterable[str], *, contract: str, version: int) -> dict[str, Any]:
    """The envelope headers (``Ba-Contract`` and ``Ba-Version`` fixed for one contract), ``required`` marked."""
    properties: dict[str, Any] = {
        MSG_ID: {"type": "string", "description": "unique message id (JetStream de-duplicates on it)"},
        CONTRACT: {"type": "string", "description": "contract name"},
        VERSION: {"type": "string", "pattern": "^[0-9]+$", "description": "contract version (an integer)"},
        CONVERSATION_ID: {"type": "string", "description": "the conversation, copied into every message it causes"},
        CAUSATION_ID: {"type": "string", "description": "Nats-Msg-Id of the message that caused this one"},
        SENDER: {"type": "string", "description": "name of the sending agent"},
        SENT_AT: {"type": "string", "pattern": "^[0-9]+$", "description": "send time, ns since the Unix epoch"},
        TRACEPARENT: {"type": "string", "description": "W3C trace context (when telemetry is on)"},
        TRACESTATE: {"type": "string", "description": "W3C trace state"},
        REPLAY_OF: {"type": "string", "description": "on a replayed dead letter: the original message's id"},
    }
    properties[CONTRACT] = {**properties[CONTRACT], "const": contract}
    properties[VERSION] = {**properties[VERSION], "const": str(version)}
    return {"type": "object", "required": list(required), "properties": properties}


def _message(
    info: ContractInfo, payload: dict[str, Any], required: tuple[str, ...] = _ENVELOPE_REQUIRED
) -> dict[str, Any]:
    """A contract's message (a query's reply: with its ``required`` headers): payload and headers."""
    return {
        "name": info.name,
        "title": info.name,
        "summary": info.description or f"{info.kind.value} {info.name}",
        "contentType": "application/json",
        "headers": _headers(required, contract=info.name, version=info.version),
        "payload": payload,
        "x-busagents": {"kind": info.kind.value, "version": info.version, "durable": info.durable},
    }


def _error_message(info: ContractInfo) -> dict[str, Any]:
    """What a requester gets when the answering agent failed: the reason in a header, no body."""
    return {
        "name": _error_name(info),
        "title": _error_name(info),
        "summary": f"{info.name} failed: the answering agent's reason in {ERROR_HEADER}, an empty body",
        "contentType": "application/octet-stream",
        "headers": {
            "type": "object",
            "required": [ERROR_HEADER],
            "properties": {ERROR_HEADER: {"type": "string", "description": "why the query failed (one line)"}},
        },
        "payload": {"type": "string", "maxLength": 0},
    }


def _channel(info: ContractInfo) -> dict[str, Any]:
    """A contract's channel: its subject (a keyed one ends with the key) and its one message."""
    channel: dict[str, Any] = {
        "address": f"{info.subject}.{{{info.key}}}" if info.key else info.subject,
        "title": info.name,
        "description": f"{info.kind.value} {info.name}" + (" (JetStream, durable)" if info.durable else ""),
        "messages": {info.name: {"$ref": f"#/components/messages/{info.name}"}},
        "x-busagents": {"kind": info.kind.value, "version": info.version, "durable": info.durable},
    }
    if info.key:
        channel["parameters"] = {
            info.key: {
                "description": f"the message's {info.key} field (whitespace, '.', '*' and '>' become '_')",
                "location": f"$message.payload#/{_json_name(info, info.key)}",
            }
        }
    return channel


def _reply_channel(info: ContractInfo, reply: ContractInfo) -> dict[str, Any]:
    return {
        "address": None,
        "title": f"{info.name} replies",
        "description": f"The requester's inbox: the NATS reply subject of the {info.name} request. "
        f"One message: {reply.name}, or {_error_name(info)} when the answering agent failed.",
        "messages": {
            reply.name: {"$ref": f"#/components/messages/{reply.name}"},
            _error_name(info): {"$ref": f"#/components/messages/{_error_name(info)}"},
        },
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": "DeadLetter",
        "title": "DeadLetter",
        "summary": "A message an agent could not handle, with the reason; its body is the original body",
        "contentType": "application/octet-stream",
        "headers": {
            "type": "object",
            "required": list(_DLQ_REQUIRED),
            "properties": {
                MSG_ID: {"type": "string", "description": "the dead letter's own id"},
                DLQ_REASON: {"type": "string", "maxLength": 2000, "description": "why, one line"},
                DLQ_SUBJECT: {"type": "string", "description": "the subject the original came on"},
                DLQ_AGENT: {"type": "string", "description": "the agent that gave up on it"},
                DLQ_STAGE: {"type": "string", "enum": _DLQ_STAGES, "description": "where it failed"},
                DLQ_DELIVERIES: {"type": "string", "description": "deliveries of a durable message"},
                DLQ_MSG_ID: {"type": "string", "description": "the original Nats-Msg-Id"},
                DLQ_TRUNCATED: {"type": "string", "description": "the original body's size, when it was cut to fit"},
                DLQ_DROPPED: {"type": "string", "description": "original headers not copied, and why"},
            },
            "additionalProperties": {"type": "string", "description": "the original message's other headers"},
        },
        "payload": {"type": "string", "description": "the original body (bytes)"},
    }


def _dead_letter_channel(agents: list[str]) -> dict[str, Any]:
    return {
        "address": f"{DLQ_PREFIX}.{{agent}}",
        "title": "Dead letters",
        "description": f"What each agent could not handle, kept in the {DLQ_STREAM} JetStream stream "
        f"({DLQ_PREFIX}.>); `busagents dlq list|show|replay` reads them.",
        "parameters": {
            "agent": {
                "description": "the agent that dead-lettered the message",
                **({"enum": sorted(set(agents))} if agents else {}),
                "location": f"$message.header#/{DLQ_AGENT}",
            }
        },
        "messages": {"DeadLetter": {"$ref": "#/components/messages/DeadLetter"}},
    }


def _operations(agent: type[Agent]) -> dict[str, Any]:
    """An agent's operations: it receives what it consumes, sends what it produces, and dead-letters."""
    operations: dict[str, Any] = {}
    for contract in agent.consumes():
        info = contract_info(contract)
        receive = _operation(agent, "receive", info, f"{agent.name} handles {info.name} ({info.kind.value})")
        receive["bindings"] = {"nats": {"queue": agent.name}}
        operations[f"{agent.name}.receive.{info.name}"] = receive
    for contract in agent.produces:
        info = contract_info(contract)
        verb = "requests" if info.kind is Kind.QUERY else "sends"
        operations[f"{agent.name}.send.{info.name}"] = _operation(
            agent, "send", info, f"{agent.name} {verb} {info.name} ({info.kind.value})"
        )
    operations[f"{agent.name}.send.DeadLetter"] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{DEAD_LETTERS}"},
        "messages": [{"$ref": f"#/channels/{DEAD_LETTERS}/messages/DeadLetter"}],
        "summary": f"{agent.name} dead-letters what it cannot handle on {DLQ_PREFIX}.{agent.name}",
        "x-busagents": {"agent": agent.name},
    }
    return operations


def _operation(agent: type[Agent], action: str, info: ContractInfo, summary: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{info.name}"},
        "messages": [{"$ref": f"#/channels/{info.name}/messages/{info.name}"}],
        "summary": summary,
        "x-busagents": {"agent": agent.name},
    }
    if info.reply is not None:
        channel = reply_channel(info)
        reply = contract_info(info.reply)
        operation["reply"] = {
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [
                {"$ref": f"#/channels/{channel}/messages/{reply.name}"},
                {"$ref": f"#/channels/{channel}/messages/{_error_name(info)}"},
            ],
            "x-busagents-reply-to": REPLY_TO,
        }
    return operation


def _json_name(info: ContractInfo, field: str) -> str:
    """The JSON name of a contract's field (a renamed msgspec field, a pydantic alias)."""
    if info.is_struct:
        for f in msgspec.structs.fields(info.cls):
            if f.name == field:
                return f.encode_name
        return field
    model_field = info.cls.model_fields.get(field)
    return (model_field.serialization_alias or model_field.alias or field) if model_field else field


def _component_schema(info: ContractInfo, schemas: dict[str, Any]) -> dict[str, Any]:
    """The payload schema with its definitions hoisted into ``components.schemas``."""
    template = "#/components/schemas/{name}"
    if info.is_struct:
        (ref,), components = msgspec.json.schema_components([info.cls], ref_template=template)
        schemas.update(components)
        return dict(ref)
    schema = info.cls.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
    schemas.update(schema.pop("$defs", {}))
    schemas[info.cls.__name__] = schema
    return {"$ref": template.format(name=info.cls.__name__)}
