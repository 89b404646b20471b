"""A swarm's contracts and flows as one self-contained HTML page, read from its AsyncAPI document.

``busagents swarm docs -o DIR`` writes ``index.html`` and ``asyncapi.json`` side by side: the page
shows exactly what the document says (agents and what each receives, sends and requests; every
contract's subject, fields and headers; the replies; the dead letters), with no script, style
sheet or font fetched from anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .asyncapi import DEAD_LETTERS

if TYPE_CHECKING:
    from .graph import Graph

__all__ = ["render_html", "write_docs"]

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d232a;background:#fbfbfc}
header{background:#1f3a5f;color:#fff;padding:1rem 2rem}header h1{margin:0;font-size:1.5rem}
nav{padding:.5rem 2rem;background:#e8edf3}nav a{margin-right:1.2rem}
main{padding:0 2rem 3rem;max-width:72rem}section{margin-top:2rem}
article{background:#fff;border:1px solid #d8dee6;border-radius:6px;padding:.2rem 1rem 1rem;margin:1rem 0}
table{border-collapse:collapse;margin:.5rem 0;width:100%}
th,td{border:1px solid #d8dee6;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f1f4f8}code{background:#f1f4f8;padding:0 .2rem;border-radius:3px}
.kind{font-size:.8rem;padding:.05rem .4rem;border-radius:3px;background:#dde7f3;margin-left:.4rem}
.req{color:#a3261b;font-weight:600}
"""


def write_docs(graph: Graph, out: Path, *, title: str, nats_url: str | None = None) -> list[Path]:
    """Write ``index.html`` and ``asyncapi.json`` of ``graph`` into ``out``; returns their paths."""
    doc = graph.asyncapi(title=title, nats_url=nats_url)
    out.mkdir(parents=True, exist_ok=True)
    page, spec = out / "index.html", out / "asyncapi.json"
    spec.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    page.write_text(render_html(doc), encoding="utf-8")
    return [page, spec]


def render_html(doc: dict[str, Any]) -> str:
    """The page of an AsyncAPI document made by :meth:`Graph.asyncapi`."""
    page = _Page(doc)
    title = escape(doc["info"]["title"])
    body = "\n".join(
        [
            f"<header><h1>{title}</h1><p>{escape(doc['info'].get('description', ''))}</p></header>",
            '<nav><a href="#agents">Agents</a><a href="#flows">Flows</a><a href="#contracts">Contracts</a>'
            '<a href="#dead-letters">Dead letters</a><a href="#types">Types</a>'
            '<a href="asyncapi.json">asyncapi.json</a></nav>',
            "<main>",
            page.servers(),
            page.agents(),
            page.flows(),
            page.contracts(),
            page.dead_letters(),
            page.types(),
            "</main>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


class _Page:
    """The sections of the page, read from one document."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.channels: dict[str, Any] = doc["channels"]
        self.messages: dict[str, Any] = doc["components"]["messages"]
        self.schemas: dict[str, Any] = doc["components"]["schemas"]
        self.by_agent: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for operation in doc["operations"].values():
            agent = operation["x-busagents"]["agent"]
            self.by_agent.setdefault(agent, []).append((_channel_name(operation["channel"]), operation))
        self.contracts_shown = {name for name, ch in self.channels.items() if "x-busagents" in ch}

    def servers(self) -> str:
        rows = [
            [
                escape(name),
                f"<code>{escape(s['protocol'])}://{escape(s['host'])}</code>",
                escape(s.get("description", "")),
            ]
            for name, s in self.doc.get("servers", {}).items()
        ]
        return '<section id="servers"><h2>Servers</h2>' + _table(["name", "URL", ""], rows) + "</section>"

    def agents(self) -> str:
        parts = ['<section id="agents"><h2>Agents</h2>']
        for agent, operations in sorted(self.by_agent.items()):
            rows = []
            for channel, operation in operations:
                if channel == DEAD_LETTERS:
                    what = "dead-letters"
                elif operation["action"] == "receive":
                    what = "answers" if "reply" in operation else "consumes"
                else:
                    what = "requests" if "reply" in operation else "produces"
                rows.append([what, self._contract_link(channel), escape(operation.get("summary", ""))])
            order = {"consumes": 0, "answers": 1, "produces": 2, "requests": 3, "dead-letters": 4}
            rows.sort(key=lambda r: (order[r[0]], r[1]))
            parts.append(
                f'<article id="{_id("agent", agent)}"><h3>{escape(agent)}</h3>'
                + _table(["", "contract", ""], rows)
                + "</article>"
            )
        return "".join(parts) + "</section>"

    def flows(self) -> str:
        """Who sends each contract to whom."""
        senders: dict[str, list[str]] = {}
        receivers: dict[str, list[str]] = {}
        for agent, operations in self.by_agent.items():
            for channel, operation in operations:
                if channel in self.contracts_shown:
                    side = receivers if operation["action"] == "receive" else senders
                    side.setdefault(channel, []).append(agent)
        rows = [
            [
                self._agents(senders.get(name, [])) or "<em>outside the swarm</em>",
                self._contract_link(name),
                self._agents(receivers.get(name, [])) or "<em>outside the swarm</em>",
            ]
            for name in sorted(self.contracts_shown)
        ]
        return '<section id="flows"><h2>Flows</h2>' + _table(["from", "contract", "to"], rows) + "</section>"

    def contracts(self) -> str:
        parts = ['<section id="contracts"><h2>Contracts</h2>']
        for name in sorted(self.contracts_shown):
            channel = self.channels[name]
            info = channel["x-busagents"]
            facts = [
                ["subject", f"<code>{escape(channel['address'])}</code>"],
                ["version", escape(str(info["version"]))],
                ["delivery", "JetStream (durable)" if info["durable"] else "core NATS"],
            ]
            for param, spec in channel.get("parameters", {}).items():
                facts.append([f"parameter <code>{escape(param)}</code>", escape(spec.get("description", ""))])
            parts.append(
                f'<article id="{_id("contract", name)}"><h3>{escape(name)}'
                f'<span class="kind">{escape(info["kind"])}</span></h3>'
                + _table(["", ""], facts)
                + self._message(self.messages[name])
            )
            reply = f"{name}-reply"
            if reply in self.channels:
                parts.append(f"<h4>Replies</h4><p>{escape(self.channels[reply]['description'])}</p>")
                parts.extend(self._message(self.messages[m], level=5) for m in self.channels[reply]["messages"])
            parts.append("</article>")
        return "".join(parts) + "</section>"

    def dead_letters(self) -> str:
        channel = self.channels[DEAD_LETTERS]
        agents = channel["parameters"]["agent"].get("enum", [])
        return (
            f'<section id="dead-letters"><h2>Dead letters</h2><p>{escape(channel["description"])}</p>'
            f"<p>Subject <code>{escape(channel['address'])}</code>, for {self._agents(agents)}.</p>"
            + self._message(self.messages["DeadLetter"])
            + "</section>"
        )

    def types(self) -> str:
        """Every payload schema, for the links from fields of a nested type."""
        parts = ['<section id="types"><h2>Types</h2>']
        for name, schema in sorted(self.schemas.items()):
            parts.append(f'<article id="{_id("schema", name)}"><h3>{escape(name)}</h3>{self._fields(schema)}</article>')
        return "".join(parts) + "</section>"

    def _message(self, message: dict[str, Any], level: int = 4) -> str:
        headers = message.get("headers", {})
        required = set(headers.get("required", []))
        header_rows = [
            [
                f"<code>{escape(h)}</code>",
                self._type(spec),
                '<span class="req">required</span>' if h in required else "",
                escape(spec.get("description", "")),
            ]
            for h, spec in headers.get("properties", {}).items()
        ]
        others = headers.get("additionalProperties")
        if isinstance(others, dict):
            header_rows.append(["<em>any other</em>", self._type(others), "", escape(others.get("description", ""))])
        return (
            f"<h{level}>{escape(message['name'])}</h{level}><p>{escape(message.get('summary', ''))}</p>"
            f"<p>Body ({escape(message.get('contentType', 'application/json'))}):</p>"
            + self._fields(message["payload"])
            + "<p>Headers:</p>"
            + _table(["header", "value", "", "description"], header_rows)
        )

    def _fields(self, schema: dict[str, Any]) -> str:
        """The fields of an object schema (a ``$ref`` followed), or its type."""
        schema = self._resolve(schema)
        properties = schema.get("properties")
        if not properties:
            return f"<p>{self._type(schema)} {escape(schema.get('description', ''))}</p>"
        required = set(schema.get("required", []))
        rows = [
            [
                f"<code>{escape(field)}</code>",
                self._type(spec),
                '<span class="req">required</span>' if field in required else "optional",
                escape(self._resolve(spec).get("description", "") or spec.get("title", "")),
            ]
            for field, spec in properties.items()
        ]
        return _table(["field", "type", "", "description"], rows)

    def _type(self, schema: dict[str, Any]) -> str:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            return f'<a href="#{_id("schema", name)}">{escape(name)}</a>'
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                return " | ".join(self._type(s) for s in schema[combinator])
        if "enum" in schema:
            return "one of " + ", ".join(f"<code>{escape(json.dumps(v))}</code>" for v in schema["enum"])
        if "const" in schema:
            return f"<code>{escape(json.dumps(schema['const']))}</code>"
        kind = schema.get("type", "any")
        if isinstance(kind, list):
            return " | ".join(escape(str(k)) for k in kind)
        if kind == "array":
            return f"array of {self._type(schema.get('items', {}))}"
        if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            return f"map of {self._type(schema['additionalProperties'])}"
        return escape(str(kind)) + (f" ({escape(schema['format'])})" if "format" in schema else "")

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return dict(self.schemas.get(ref.rsplit("/", 1)[-1], schema))
        return schema

    def _contract_link(self, channel: str) -> str:
        if channel == DEAD_LETTERS:
            return '<a href="#dead-letters">dead letters</a>'
        return f'<a href="#{_id("contract", channel)}">{escape(channel)}</a>'

    def _agents(self, names: Iterable[str]) -> str:
        return ", ".join(f'<a href="#{_id("agent", n)}">{escape(n)}</a>' for n in sorted(set(names)))


def _channel_name(ref: dict[str, str]) -> str:
    return ref["$ref"].rsplit("/", 1)[-1]


def _id(kind: str, name: str) -> str:
    """An element id: the kind, then the name with anything but letters, digits, '-', '_' and '.' as '_'."""
    return f"{kind}-" + "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table of cells that are already HTML."""
    if not rows:
        return "<p><em>none</em></p>"
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
