"""``busagents dlq list|show|replay``: inspect and replay the dead letters kept in ``BUSAGENTS_DLQ``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from ..bus import Bus
from ..dlq import DeadLetter, Replayed, ReplayError, dead_letters, get_dead_letter, replay_dead_letter
from ..errors import ConfigError
from ._nats import nats_option, nats_url

T = TypeVar("T")


@click.group("dlq")
def dlq_group() -> None:
    """Dead letters: messages an agent could not handle, kept with the reason."""


@dlq_group.command("list")
@nats_option
@click.option("--agent", default=None, help="Only this agent's dead letters.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
def list_command(nats: str | None, agent: str | None, limit: int) -> None:
    """List dead letters, oldest first: sequence, time, agent, stage, subject, reason."""
    letters = _run(nats, lambda bus: dead_letters(bus, agent=agent, limit=limit))
    if not letters:
        click.echo("no dead letters")
        return
    widths = [max(len(getattr(d, column)) for d in letters) for column in ("agent", "stage", "subject")]
    for d in letters:
        when = d.time.strftime("%Y-%m-%d %H:%M:%S") if d.time else "-"
        cells = "  ".join(
            f"{value:<{width}}" for value, width in zip((d.agent, d.stage, d.subject), widths, strict=True)
        )
        cut = " [body truncated]" if d.truncated is not None else ""
        click.echo(f"{d.seq:>6}  {when}  {cells}  {_short(d.reason, 80)}{cut}")


@dlq_group.command("show")
@nats_option
@click.argument("seq", type=int)
def show_command(nats: str | None, seq: int) -> None:
    """Show one dead letter: its headers and its body."""
    d = _run(nats, lambda bus: get_dead_letter(bus, seq))
    click.echo(f"dead letter #{d.seq} from {d.agent} ({d.stage}), originally on {d.subject}")
    click.echo(f"reason: {d.reason}")
    if d.deliveries is not None:
        click.echo(f"deliveries: {d.deliveries}")
    click.echo("headers:")
    for key, value in sorted(d.headers.items()):
        click.echo(f"  {key}: {value}")
    if d.truncated is not None:
        click.echo(f"body (the first {len(d.data)} of {d.truncated} bytes):")
    else:
        click.echo("body:")
    try:
        click.echo(json.dumps(json.loads(d.data), indent=2, ensure_ascii=False))
    except ValueError:
        click.echo(repr(d.data))


@dlq_group.command("replay")
@nats_option
@click.argument("seqs", nargs=-1, type=int)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter (of --agent, if given).")
@click.option("--agent", default=None, help="With --all: only this agent's dead letters.")
@click.option("--delete", is_flag=True, help="Delete each dead letter once replayed.")
def replay_command(nats: str | None, seqs: tuple[int, ...], replay_all: bool, agent: str | None, delete: bool) -> None:
    """Publish dead letters again on their original subjects (by sequence, or --all).

    A subject a stream captures is replayed through JetStream, any other on core NATS (only
    the agents subscribed at that moment get it). Exits with 1 when any was not replayed.
    """
    if not seqs and not replay_all:
        raise click.UsageError("give the sequence numbers to replay (see 'busagents dlq list'), or --all")
    if seqs and replay_all:
        raise click.UsageError("give either sequence numbers or --all, not both")
    if agent and not replay_all:
        raise click.UsageError("--agent narrows --all; with sequence numbers, replay exactly those")

    async def replay(bus: Bus) -> list[tuple[DeadLetter, Replayed | ReplayError]]:
        if replay_all:
            letters = await dead_letters(bus, agent=agent, limit=1_000_000)
        else:
            letters = [await get_dead_letter(bus, seq) for seq in seqs]
        outcomes: list[tuple[DeadLetter, Replayed | ReplayError]] = []
        for letter in letters:
            try:
                outcomes.append((letter, await replay_dead_letter(bus, letter, delete=delete)))
            except ReplayError as exc:
                outcomes.append((letter, exc))
        return outcomes

    outcomes = _run(nats, replay)
    for letter, outcome in outcomes:
        if isinstance(outcome, ReplayError):
            click.echo(f"not replayed #{letter.seq}: {outcome}", err=True)
        else:
            deleted = " (dead letter deleted)" if delete else ""
            click.echo(f"replayed #{letter.seq} on {letter.subject} {outcome}{deleted}")
    failed = sum(isinstance(outcome, ReplayError) for _, outcome in outcomes)
    click.echo(f"{len(outcomes) - failed} dead letter(s) replayed" + (f", {failed} not" if failed else ""))
    if failed:
        sys.exit(1)


def _run(nats: str | None, action: Callable[[Bus], Awaitable[T]]) -> T:
    with nats_url(nats) as url:  # dead letters live on a server that keeps them, never an embedded one

        async def main() -> T:
            bus = await Bus.connect(url, name="busagents-dlq")
            try:
                return await action(bus)
            finally:
                await bus.close()

        try:
            return asyncio.run(main())
        except TimeoutError:
            raise ConfigError(f"NATS at {url} did not answer: is JetStream enabled?") from None


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
