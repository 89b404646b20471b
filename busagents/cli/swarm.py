"""``busagents swarm up|check|graph|asyncapi|permissions SWARM.toml``."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import click

from ..agent import Agent
from ..errors import ConfigError
from ..plugins import load_agent
from ..swarm import Graph, Supervisor, SwarmConfig, load_swarm
from ._nats import nats_url

swarm_file = click.argument("path", type=click.Path(dir_okay=False, path_type=Path))


@click.group("swarm")
def swarm_group() -> None:
    """Run and inspect a swarm of agents described by a swarm.toml."""


def _load(path: Path) -> tuple[SwarmConfig, dict[str, type[Agent]]]:
    """The swarm file and its agent classes by swarm key."""
    config = load_swarm(path)
    agents = {}
    for key, target in config.targets().items():
        try:
            agents[key] = load_agent(target)
        except ConfigError as exc:
            raise ConfigError(f"{path}: agents.{key}: {exc}") from None
    return config, agents


def _graph(path: Path) -> Graph:
    return Graph(list(_load(path)[1].values()))


@swarm_group.command("up")
@swarm_file
@click.option("--nats", "nats", envvar="BUSAGENTS_NATS_URL", help="NATS URL (default: the file's, else embedded).")
@click.pass_context
def up(ctx: click.Context, path: Path, nats: str | None) -> None:
    """Start every agent as supervised OS processes until SIGTERM/SIGINT."""
    config, agents = _load(path)
    refused = config.check(agents)
    if refused:  # graph problems only warn: contracts may be fed or answered from outside the swarm
        raise ConfigError(f"{path}: " + "; ".join(p.message for p in refused))
    for problem in Graph(list(agents.values())).check():
        click.echo(f"graph {problem}", err=True)
    with nats_url(nats or config.nats_url, embedded=not (nats or config.nats_url)) as url:
        level = ctx.find_root().params.get("log_level")
        supervisor = Supervisor(config, url, on_event=lambda t: click.echo(t, err=True), log_level=level)
        failed = asyncio.run(_up(supervisor))
    if failed:
        raise SystemExit(1)


async def _up(supervisor: Supervisor) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await supervisor.run(stop)


@swarm_group.command("check")
@swarm_file
@click.option("--external", multiple=True, help="A contract fed from outside the swarm (repeatable).")
def check(path: Path, external: tuple[str, ...]) -> None:
    """Check the swarm: consumers without producers, commands nobody handles, singletons with replicas..."""
    config, agents = _load(path)
    problems = Graph(list(agents.values())).check(external) + config.check(agents)
    for problem in problems:
        click.echo(str(problem))
    if any(p.severity == "error" for p in problems):
        raise ConfigError(f"{path}: the swarm has errors")
    click.echo(f"ok ({len(problems)} warning(s))")


@swarm_group.command("graph")
@swarm_file
def graph(path: Path) -> None:
    """Print the swarm as a Mermaid flowchart."""
    click.echo(_graph(path).mermaid())


@swarm_group.command("asyncapi")
@swarm_file
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
def asyncapi(path: Path, output: Path | None) -> None:
    """Write the swarm's AsyncAPI 3 document (JSON)."""
    text = json.dumps(_graph(path).asyncapi(title=path.stem), indent=2)
    if output is None:
        click.echo(text)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)


@swarm_group.command("permissions")
@swarm_file
def permissions(path: Path) -> None:
    """Least-privilege NATS publish/subscribe permissions per agent (JSON)."""
    click.echo(json.dumps(_graph(path).permissions(), indent=2))
