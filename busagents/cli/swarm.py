"""``busagents swarm up|check|graph|asyncapi|permissions|docs|k8s SWARM.toml``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from ..agent import Agent
from ..bus import NKEY_SEED_FILE_ENV, TLS_CA_ENV
from ..errors import ConfigError
from ..plugins import load_agent
from ..server import NatsServer, is_reachable
from ..settings import data_dir
from ..swarm import Graph, Supervisor, SwarmConfig, load_swarm
from ..swarm.asyncapi import DEFAULT_NATS_URL
from ..swarm.docs import write_docs
from ..swarm.k8s import K8sOptions, k8s_manifests, write_k8s
from ._nats import nats_option, nats_url
from ._swarm_view import SwarmView
from .agents import CREDS_DIR_ENV

swarm_file = click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
F = TypeVar("F", bound=Callable[..., Any])


def _output_dir(help_: str) -> Callable[[F], F]:
    """``-o/--output DIR``: the directory a command writes its files into (created if missing)."""
    return click.option(
        "-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help=help_
    )


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
@nats_option
@click.option("--force", is_flag=True, help="Start the swarm even when 'swarm check' reports errors.")
@click.option("--external", multiple=True, help="A contract fed or answered from outside the swarm (repeatable).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the agents write their files (BUSAGENTS_DATA_DIR of each replica); default: per user and swarm file.",
)
@click.option(
    "--conversation-log",
    is_flag=True,
    help="Keep core messages for 'busagents trace' (BUSAGENTS_CONVERSATION_LOG=1 in every replica).",
)
@click.option(
    "--secure",
    "secure_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run against the secured server of DIR ('swarm secure -o DIR'), starting it if it does not answer; "
    "each agent connects with its own nkey over TLS.",
)
@click.pass_context
def up(
    ctx: click.Context,
    path: Path,
    nats: str | None,
    force: bool,
    external: tuple[str, ...],
    data_dir: Path | None,
    conversation_log: bool,
    secure_dir: Path | None,
) -> None:
    """Start every agent as supervised OS processes until SIGTERM/SIGINT.

    Refuses a swarm whose check reports errors (a query nobody answers...) unless --force. In a
    terminal, shows a live table of agents, replicas, restarts and handled messages.
    """
    config, agents = _load(path)
    _refuse_errors(path, config, agents, external, force=force)
    data = (data_dir or default_data_dir(path)).absolute()
    data.mkdir(parents=True, exist_ok=True)
    click.echo(f"data directory: {data}", err=True)
    if conversation_log:  # the replicas inherit this process's environment (busagents.convlog)
        os.environ["BUSAGENTS_CONVERSATION_LOG"] = "1"
    named = (config.nats_url, f"nats_url in {path}") if config.nats_url else None
    with contextlib.ExitStack() as secured:
        if secure_dir is not None:
            nats = secured.enter_context(_secured(secure_dir, {a.name for a in agents.values()}))
        _up_on(ctx, config, agents, nats, named, data)


def _up_on(
    ctx: click.Context,
    config: SwarmConfig,
    agents: dict[str, type[Agent]],
    nats: str | None,
    named: tuple[str, str] | None,
    data: Path,
) -> None:
    # an embedded server stops after the replicas drained
    with nats_url(nats, embed=True, named=named, scheduling=config.server_scheduling) as url:
        level = ctx.find_root().params.get("log_level")
        # in a terminal, the live view owns it: the events and what the replicas print come through the view
        view = SwarmView(agents) if sys.stdout.isatty() else None
        say = view.say if view is not None else lambda text: click.echo(text, err=True)
        supervisor = Supervisor(config, url, on_event=say, log_level=level, data_dir=data, capture_output=bool(view))
        failed = asyncio.run(_up(supervisor, url, view))
    if failed:
        raise SystemExit(1)


@contextlib.contextmanager
def _secured(secure_dir: Path, names: set[str]) -> Iterator[str]:
    """The URL of DIR's secured server (started from its configuration for the block if it does not answer).

    This process connects as the operator; each replica as its own agent (``run`` finds its seed in
    BUSAGENTS_CREDS_DIR). Only paths go into the environment, never a seed.
    """
    from ..swarm.secure import OPERATOR, load_secure  # cryptography: 13 MB that every agent process would carry

    setup = load_secure(secure_dir)
    missing = sorted(names - set(setup.agents))
    if missing:
        raise ConfigError(
            f"{secure_dir} has no credentials for {', '.join(missing)}: run 'busagents swarm secure' again"
        )
    os.environ[CREDS_DIR_ENV] = str(setup.creds_dir)
    os.environ[NKEY_SEED_FILE_ENV] = str(setup.creds(OPERATOR))
    os.environ[TLS_CA_ENV] = str(setup.ca)
    if is_reachable(setup.url):
        yield setup.url
        return
    # JetStream and its store come from the configuration (nats-server opens its port once JetStream is up)
    server = NatsServer(port=setup.port, config_file=setup.config, store_dir=setup.dir / "jetstream", jetstream=False)
    with server:
        click.echo(
            f"started the secured nats-server of {secure_dir} on {server.url} (log: {server.store_dir})", err=True
        )
        yield server.url


def _refuse_errors(
    path: Path, config: SwarmConfig, agents: Mapping[str, type[Agent]], external: tuple[str, ...], *, force: bool
) -> None:
    """Print what 'swarm check' reports; refuse its errors unless ``force`` (a singleton with replicas: always)."""
    problems = config.check(agents)
    never = [p for p in problems if p.severity == "error"]
    if never:  # a second instance of a singleton would corrupt its state: --force does not start it
        raise ConfigError(f"{path}: " + "; ".join(p.message for p in never))
    problems += Graph(list(agents.values())).check(external)
    for problem in problems:
        click.echo(str(problem), err=True)
    errors = sum(1 for p in problems if p.severity == "error")
    if errors and not force:
        raise ConfigError(
            f"{path}: 'swarm check' reports {errors} error(s) (listed above); fix them, name the contracts "
            "fed or answered from outside with --external, or start the swarm anyway with --force"
        )
    if errors:
        click.echo(f"--force: starting the swarm despite {errors} error(s)", err=True)


def default_data_dir(path: Path) -> Path:
    """The data directory of a swarm file: one per file, in busagents' data directory (see ``data_dir``)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return data_dir() / "swarms" / f"{path.stem}-{digest}"


async def _up(supervisor: Supervisor, url: str, view: SwarmView | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if view is None:
        return await supervisor.run(stop)
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(supervisor.run(stop), name="swarm:supervisor")
        tasks.create_task(view.show(supervisor, url, running), name="swarm:view")
    return running.result()


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


_servers_option = click.option(
    "--nats",
    "nats",
    envvar="BUSAGENTS_NATS_URL",
    help=f"NATS URL the document's servers name (default: the file's nats_url, else {DEFAULT_NATS_URL}).",
)


@swarm_group.command("asyncapi")
@swarm_file
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None)
@_servers_option
def asyncapi(path: Path, output: Path | None, nats: str | None) -> None:
    """Write the swarm's AsyncAPI 3 document (JSON): channels, messages, operations, servers, dead letters."""
    config, agents = _load(path)
    doc = Graph(list(agents.values())).asyncapi(title=path.stem, nats_url=nats or config.nats_url)
    text = json.dumps(doc, indent=2)
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


@swarm_group.command("secure")
@swarm_file
@_output_dir("Directory to write the server configuration, keys and seeds into (created if missing).")
@click.option("--port", type=click.IntRange(1, 65535), default=4222, show_default=True, help="The server's port.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Server certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Its private key.")
@click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None, help="The CA that signed it.")
def secure(path: Path, out: Path, port: int, tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None) -> None:
    """Write a locked-down nats-server setup: TLS, one nkey user per agent with its permissions, an operator user.

    Without --tls-*, a local CA and a certificate for 127.0.0.1/localhost are generated. Seeds and
    private keys go into owner-only files and are never printed. Run it with 'swarm up --secure DIR'.
    """
    from ..swarm.secure import write_secure  # see _secured

    written = write_secure(
        _graph(path).permissions(), out, port=port, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca
    )
    for file in written:
        click.echo(f"wrote {file}", err=True)
    click.echo(f"start it: busagents swarm up {path} --secure {out} (or nats-server -c {out / 'nats-server.conf'})")


@swarm_group.command("docs")
@swarm_file
@_output_dir("Directory to write index.html and asyncapi.json into (created if missing).")
@_servers_option
def docs(path: Path, out: Path, nats: str | None) -> None:
    """Write a browsable HTML page of the swarm's contracts and flows, with its asyncapi.json beside it."""
    config, agents = _load(path)
    graph = Graph(list(agents.values()))
    for written in write_docs(graph, out, title=path.stem, nats_url=nats or config.nats_url):
        click.echo(f"wrote {written}", err=True)


@swarm_group.command("k8s")
@swarm_file
@_output_dir("Directory to write the kustomization, the manifests and nats/values.yaml into (created if missing).")
@click.option("--image", default=K8sOptions.image, show_default=True, help="The agents' image (deploy/Dockerfile).")
@click.option("--namespace", default=K8sOptions.namespace, show_default=True, help="Namespace of NATS and the agents.")
@click.option(
    "--lag",
    "lag",
    type=click.IntRange(min=1),
    default=K8sOptions.lag_threshold,
    show_default=True,
    help="KEDA lagThreshold of an agent without autoscale (pending messages per replica before one is added).",
)
def k8s(path: Path, out: Path, image: str, namespace: str, lag: int) -> None:
    """Write Kubernetes manifests: a Deployment per agent, KEDA ScaledObjects, the NATS Helm chart's values."""
    config, agents = _load(path)
    options = K8sOptions(image=image, namespace=namespace, lag_threshold=lag)
    for written in write_k8s(k8s_manifests(config, agents, options), out):
        click.echo(f"wrote {written}", err=True)
    click.echo(
        f"next: helm install nats nats/nats -n {namespace} --create-namespace -f {out / 'nats' / 'values.yaml'}"
        f" (https://nats-io.github.io/k8s/helm/charts/), then kubectl apply -k {out}",
        err=True,
    )
