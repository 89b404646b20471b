"""``busagents replay --conversation ID`` and ``busagents shadow report``."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import click

from ..bus import Bus
from ..errors import ConfigError
from ..observe import Catalog
from ..replay import Replayed, default_namespace, replay_conversation
from ..shadow import ShadowReport, compare
from ..subjects import namespace_prefix
from ._nats import nats_option, nats_url

__all__ = ["replay_command", "shadow_group"]


def _time(value: str | None, option: str) -> float | None:
    """Seconds since the epoch, from an ISO 8601 time (UTC when no zone is given) or seconds."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: give an ISO 8601 time (2026-11-29T18:00:00) or seconds", param_hint=option
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


@click.command("replay")
@click.option("--conversation", "conversation_id", required=True, help="The conversation id (busagents trace ID).")
@nats_option
@click.option("--since", default=None, help="Only messages sent at or after this time (ISO 8601 or epoch seconds).")
@click.option("--until", default=None, help="Only messages sent at or before this time.")
@click.option("--subject", "subjects", multiple=True, help="Only messages on subjects matching this (repeatable).")
@click.option("--into", "prefix", default=None, help="Subject namespace to publish under [default: replay.<id>.].")
@click.option("--to-nats", default=None, help="Publish on this server instead (no prefix unless --into).")
@click.option("--speed", type=click.Choice(["original", "fast"]), default="fast", show_default=True)
def replay_command(
    conversation_id: str,
    nats: str | None,
    since: str | None,
    until: str | None,
    subjects: tuple[str, ...],
    prefix: str | None,
    to_nats: str | None,
    speed: str,
) -> None:
    """Publish a conversation's recorded messages again, beside production.

    Read from JetStream (the durable contracts' streams and the conversation log); published
    under a subject prefix (run the fixed agent with 'busagents run NAME --namespace PREFIX')
    or on another server, with the original timing or as fast as possible.
    """
    start, end = _time(since, "--since"), _time(until, "--until")
    namespace = (
        namespace_prefix(prefix) if prefix is not None else "" if to_nats else default_namespace(conversation_id)
    )
    catalog = Catalog.installed()
    with nats_url(nats) as url:

        async def main() -> list[Replayed]:
            source = await Bus.connect(url, name="busagents-replay")
            try:
                if to_nats is None:
                    target = Bus(source.nc, prefix=namespace)
                    return await _replay(source, target, conversation_id, catalog, start, end, subjects, speed)
                target = await Bus.connect(to_nats, name="busagents-replay", prefix=namespace)
                try:
                    return await _replay(source, target, conversation_id, catalog, start, end, subjects, speed)
                finally:
                    await target.close()
            finally:
                await source.close()

        done = asyncio.run(main())
    if not done:
        raise ConfigError(f"nothing to replay: no kept message of conversation {conversation_id} matches")
    for item in done:
        click.echo(f"+{item.at:9.3f}s  {item.contract:<24} {item.subject}")
    where = f" on {to_nats}" if to_nats else ""
    click.echo(f"replayed {len(done)} messages of {conversation_id} under {namespace or '(no prefix)'}{where}")


async def _replay(
    source: Bus,
    target: Bus,
    conversation_id: str,
    catalog: Catalog,
    since: float | None,
    until: float | None,
    subjects: tuple[str, ...],
    speed: str,
) -> list[Replayed]:
    return await replay_conversation(
        source,
        conversation_id,
        target,
        catalog,
        since=since,
        until=until,
        subjects=subjects,
        speed="original" if speed == "original" else "fast",
    )


@click.group("shadow")
def shadow_group() -> None:
    """Shadow agents (busagents run NAME --shadow): how they compare with the live ones."""


@shadow_group.command("report")
@nats_option
@click.option("--agent", default=None, help="Only this agent's shadow (the live agent's name).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0), help="Differing cases shown.")
def shadow_report_command(nats: str | None, agent: str | None, as_json: bool, limit: int) -> None:
    """Compare each shadow's recorded decisions with the live agent's, input by input."""
    catalog = Catalog.installed()
    with nats_url(nats) as url:

        async def main() -> list[ShadowReport]:
            bus = await Bus.connect(url, name="busagents-shadow")
            try:
                return await compare(bus, catalog, agent)
            finally:
                await bus.close()

        reports = asyncio.run(main())
    if not reports:
        raise ConfigError("no shadow recorded anything: start one with 'busagents run NAME --shadow'")
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2, default=str))
        return
    for report in reports:
        _print(report, limit)


def _print(report: ShadowReport, limit: int) -> None:
    s = report.summary()
    click.echo(f"{s['agent']} (live) vs {s['shadow']}")
    click.echo(
        f"  agreement: {s['agreement']:.1%} of {s['decisions']} decisions "
        f"({s['differing_decisions']} differ; {s['agreeing_cases']} of {s['cases']} cases alike)"
    )
    for side, key in (("live", "live"), ("shadow", "shadow_side")):
        click.echo(f"  {side:<7} latency median {_secs(s[key]['median_latency_seconds'])}, "
                   f"max {_secs(s[key]['max_latency_seconds'])}, tokens {s[key]['tokens']}")  # fmt: skip
    differing = [c for c in report.cases if not c.agrees]
    for case in differing[:limit]:
        click.echo(f"  input {case.input_id} ({case.input_contract or '?'}):")
        for diff in case.differences():
            click.echo(f"    {diff['decision']}")
            click.echo(f"      live:   {_show(diff['live'])}")
            click.echo(f"      shadow: {_show(diff['shadow'])}")
    if len(differing) > limit:
        click.echo(f"  ... {len(differing) - limit} more differing cases (--limit, --json)")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _show(value: Any) -> str:
    return "(nothing)" if value is None else json.dumps(value, ensure_ascii=False, default=str)
