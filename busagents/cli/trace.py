"""``busagents trace CONVERSATION_ID``: one conversation as a causal tree, from what JetStream keeps."""

from __future__ import annotations

import asyncio
import datetime
import json

import click
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from ..bus import Bus
from ..conversation import Hop, causal_tree, read_conversation
from ..errors import ConfigError
from ..observe import Catalog, Seen
from ._nats import nats_option, nats_url

__all__ = ["render_tree", "trace_command"]


@click.command("trace")
@click.argument("conversation_id")
@nats_option
@click.option("--json", "as_json", is_flag=True, help="The tree as JSON: each message with what it caused.")
@click.option("--width", default=80, show_default=True, type=click.IntRange(20), help="Characters of body shown.")
def trace_command(conversation_id: str, nats: str | None, as_json: bool, width: int) -> None:
    """Print one conversation as a causal tree: who sent what to whom, when, time per hop.

    Read from what JetStream keeps: the durable contracts' streams, the dead letters, and
    the conversation log of core messages when it is on (BUSAGENTS_CONVERSATION_LOG=1).
    Dead letters are marked, and so are messages decided with model calls (Ba-Llm: model, calls,
    tokens), the LLM layer's review and approval messages, and messages whose cause is not kept.
    """
    catalog = Catalog.installed()
    with nats_url(nats) as url:

        async def main() -> list[Hop]:
            bus = await Bus.connect(url, name="busagents-trace")
            try:
                return causal_tree(await read_conversation(bus, conversation_id, catalog))
            finally:
                await bus.close()

        try:
            roots = asyncio.run(main())
        except TimeoutError:
            raise ConfigError(f"NATS at {url} did not answer: is JetStream enabled?") from None
    if as_json:
        click.echo(json.dumps({"conversation": conversation_id, "roots": [r.as_dict() for r in roots]}, indent=2))
        return
    if not roots:
        raise ConfigError(
            f"nothing kept of conversation {conversation_id!r} on {url} (core messages are kept only "
            "with the conversation log on: BUSAGENTS_CONVERSATION_LOG=1)"
        )
    Console().print(render_tree(conversation_id, roots, width))


def render_tree(conversation_id: str, roots: list[Hop], width: int = 80, most: int = 0) -> Tree:
    """The causal tree of a conversation (see :func:`busagents.conversation.causal_tree`) for rich.

    ``most``: at most this many messages caused by one message are shown, the rest counted (0: all).
    """
    tree = Tree(f"[bold]conversation {escape(conversation_id)}[/]")
    _add_all(tree, roots, None, width, most)
    return tree


def _add_all(tree: Tree, hops: list[Hop], parent: Seen | None, width: int, most: int) -> None:
    shown = hops[:most] if most else hops
    for hop in shown:
        branch = tree.add(_label(hop, parent, width))
        _add_all(branch, hop.children, hop.seen, width, most)
    if len(shown) < len(hops):
        tree.add(f"[dim]... and {len(hops) - len(shown)} more[/]")


def _label(hop: Hop, parent: Seen | None, width: int) -> str:
    s = hop.seen
    when = datetime.datetime.fromtimestamp(s.time).strftime("%H:%M:%S.%f")[:-3] if s.time else "?"
    after = f" [yellow]+{_ms(s.time - parent.time)}[/]" if parent and parent.time and s.time else ""
    contract = escape(s.contract or "?")
    if s.dead_letter is not None:
        d = s.dead_letter
        head = f"[bold red]DEAD LETTER[/] {contract} at [bold]{escape(d['agent'])}[/] ({escape(d['stage'])})"
        return f"{when}{after} {head}: [red]{escape(d['reason'])}[/]"
    llm = f" [bold magenta]LLM {escape(s.llm)}[/]" if s.llm else " [bold magenta]LLM[/]" if _is_llm(s) else ""
    sender = escape(s.sender or "outside")
    handled_by = sorted({c.seen.sender for c in hop.children if c.seen.sender and c.seen.dead_letter is None})
    to = f" -> {escape(', '.join(handled_by))}" if handled_by else ""
    lost = " [dim](cause not kept)[/]" if hop.orphan else ""
    raw = "" if s.known else " [dim](raw)[/]"
    body = escape(s.line(width))
    return f"{when}{after} [bold]{contract}[/]{llm}{raw} {sender}{to} [dim]{escape(s.subject)}[/]{lost}\n[dim]{body}[/]"


def _is_llm(s: Seen) -> bool:
    """Messages of the LLM layer: human review and approval of a model's decision."""
    return (s.contract or "").startswith("busagents.llm.") or s.subject.startswith("busagents.llm.")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
