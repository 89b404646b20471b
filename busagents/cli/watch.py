"""``busagents watch``: the bus live, each message decoded with its contract."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from dataclasses import dataclass

import click
from nats.aio.msg import Msg

from ..bus import Bus
from ..contract import contract_info
from ..errors import ConfigError
from ..observe import Catalog, Seen, is_internal
from ..plugins import find_contract
from ._nats import nats_option, nats_url

__all__ = ["watch_command"]


@click.command("watch")
@click.argument("target", required=False)
@nats_option
@click.option("--conversation", default=None, help="Only the messages of this conversation id.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, for scripts.")
@click.option("--all", "show_all", is_flag=True, help="Also JetStream API, inboxes, heartbeats, $SRV.")
@click.option("--count", default=0, type=click.IntRange(0), help="Stop after this many messages (0: never).")
@click.option("--width", default=100, show_default=True, type=click.IntRange(20), help="Characters of body shown.")
def watch_command(
    target: str | None,
    nats: str | None,
    conversation: str | None,
    as_json: bool,
    show_all: bool,
    count: int,
    width: int,
) -> None:
    """Tail the bus live: time, contract, subject, sender, conversation and a one-line body.

    TARGET is a contract (its name or class name, as the installed agents declare it) or a
    subject (wildcards allowed); default: every subject. A contract no installed agent
    declares is shown raw. Stops on Ctrl-C (or after --count messages).
    """
    view = _View(Catalog.installed(), conversation, as_json, show_all, count, width)
    subject = _subject(target)
    with nats_url(nats) as url, contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_watch(url, subject, view))


@dataclass(frozen=True, slots=True)
class _View:
    """What to show and how."""

    catalog: Catalog
    conversation: str | None
    as_json: bool
    show_all: bool
    count: int
    width: int


def _subject(target: str | None) -> str:
    if not target:
        return ">"
    if "*" in target or ">" in target:
        return target
    try:
        return contract_info(find_contract(target)).subscribe_subject
    except ConfigError:
        return target  # not a contract name: a subject


async def _watch(url: str, subject: str, view: _View) -> None:
    bus = await Bus.connect(url, name="busagents-watch")
    done = asyncio.Event()
    shown = 0

    async def show(msg: Msg) -> None:
        nonlocal shown
        if done.is_set() or (not view.show_all and is_internal(msg.subject)):
            return
        seen = view.catalog.read(msg.subject, msg.headers, msg.data, received=time.time())
        if view.conversation is not None and seen.conversation != view.conversation:
            return
        click.echo(json.dumps(seen.as_dict(), default=str) if view.as_json else _line(seen, view.width))
        shown += 1
        if view.count and shown >= view.count:
            done.set()

    try:
        await bus.nc.subscribe(subject, cb=show)
        await bus.flush()
        only = f", conversation {view.conversation}" if view.conversation else ""
        click.echo(f"watching {subject} on {url}{only}", err=True)
        await done.wait()
    finally:
        await bus.close()


def _line(seen: Seen, width: int) -> str:
    when = datetime.datetime.fromtimestamp(seen.time or time.time()).strftime("%H:%M:%S.%f")[:-3]
    contract = seen.contract or "?"
    if seen.dead_letter is not None:
        d = seen.dead_letter
        contract = f"DEAD LETTER {contract} ({d['agent']}, {d['stage']}: {d['reason']})"
    elif not seen.known:
        contract += " (raw)"
    sender = seen.sender or "-"
    conv = seen.conversation or "-"
    return f"{when}  {contract}  {seen.subject}  from {sender}  conv {conv}  {seen.line(width)}"
