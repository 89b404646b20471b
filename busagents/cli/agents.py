"""``busagents agents list`` and ``busagents run NAME``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import click

from ..agent import Agent
from ..bus import NKEY_SEED_FILE_ENV, TLS_CA_ENV, Bus
from ..contract import contract_info
from ..convlog import conversation_log
from ..errors import ConfigError, ConnectionLostError
from ..plugins import available_agents, load_agent
from ..process import die_with_parent, set_scheduling
from ..settings import Settings
from ..shadow import shadow_of
from ..subjects import inbox_prefix, namespace_prefix
from ..telemetry import configure_from_env
from ..telemetry import shutdown as shutdown_telemetry
from ..worker import Worker, collect_young_less_often
from ._nats import nats_option, nats_url
from ._reload import run_reloading, source_dirs

log = logging.getLogger("busagents.run")

#: Where ``swarm up --secure`` tells its replicas to find their seeds (NAME.nk each).
CREDS_DIR_ENV = "BUSAGENTS_CREDS_DIR"


@click.group("agents")
def agents_group() -> None:
    """Inspect installed agent plugins."""


@agents_group.command("list")
def list_agents() -> None:
    """List agents installed in the entry-point group 'busagents.agents'."""
    plugins = available_agents()
    if not plugins:
        click.echo("no agent plugins installed (entry-point group 'busagents.agents')")
        return
    for name in sorted(plugins):
        try:
            cls = load_agent(name)
        except Exception as exc:
            click.echo(f"{name:<20} failed to load: {exc}")
            continue
        consumes = ", ".join(contract_info(c).name for c in cls.consumes()) or "-"
        produces = ", ".join(contract_info(c).name for c in cls.produces) or "-"
        click.echo(f"{name:<20} consumes: {consumes}")
        click.echo(f"{'':<20} produces: {produces}")
        if cls.name != name:  # queue group, dead letters, stats and permissions go by the agent's name
            click.echo(f"{'':<20} runs as agent {cls.name!r} (set name = {name!r} on {cls.__name__} to match)")


@click.command("run")
@click.argument("name")
@nats_option
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 64), help="OS processes.")
@click.option("--reload", is_flag=True, help="Development: restart the agent when a .py file of its source changes.")
@click.option("--namespace", default=None, help="Subject prefix (e.g. replay.c1): run beside production, not in it.")
@click.option("--dry-run", is_flag=True, help="Record what the agent sends (busagents.dryrun.<agent>); send nothing.")
@click.option("--shadow", is_flag=True, help="A dry run as NAME-shadow on live traffic, for busagents shadow report.")
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve /healthz and /metrics on this port (BUSAGENTS_HTTP_PORT; replica i of --replicas gets PORT+i).",
)
@click.option(
    "--creds",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The agent's nkey seed file (in a secured swarm: BUSAGENTS_CREDS_DIR/NAME.nk).",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="CA certificate of the server's TLS certificate (BUSAGENTS_TLS_CA): connect with TLS.",
)
@click.pass_context
def run_command(
    ctx: click.Context,
    name: str,
    nats: str | None,
    replicas: int,
    reload: bool,
    namespace: str | None,
    dry_run: bool,
    shadow: bool,
    http_port: int | None,
    creds: Path | None,
    tls_ca: Path | None,
) -> None:
    """Run the agent NAME (a plugin name or package.module:Class) until SIGTERM/SIGINT.

    Exits with status 1 when its NATS connection is closed for good (nats-py does not reconnect
    after a server's -ERR), so that a supervisor starts it again.
    """
    agent_cls = load_agent(name)
    shadow = shadow or Settings().shadow
    # as variables, so that replicas, a reloaded child and the agent's own settings see them
    if namespace is not None:
        os.environ["BUSAGENTS_SUBJECT_PREFIX"] = namespace_prefix(namespace)
    if dry_run or shadow:
        os.environ["BUSAGENTS_DRY_RUN"] = "1"
    if shadow:
        agent_cls = shadow_of(agent_cls)
    if http_port is not None:
        os.environ["BUSAGENTS_HTTP_PORT"] = str(http_port)
    _use_identity(agent_cls.name, creds, tls_ca)
    if agent_cls.singleton and replicas > 1:
        raise ConfigError(
            f"{name} declares singleton = True (it must run as one instance) "
            f"but --replicas {replicas} was given; run it with --replicas 1"
        )
    settings = Settings()
    _schedule(agent_cls, settings.scheduling)  # before any thread or replica starts: they inherit it
    with nats_url(nats, embed=True) as url:  # an embedded server stops only after the agents drained
        if reload:  # the agent runs in a child process, started again after each change
            level = ctx.find_root().params.get("log_level")
            cmd = [sys.executable, "-m", "busagents", *(["--log-level", level] if level else [])]
            cmd += ["run", name, "--nats", url, "--replicas", str(replicas), *(["--shadow"] if shadow else [])]
            run_reloading(cmd, source_dirs(agent_cls), label=name, drain_timeout=settings.drain_timeout)
            return
        if replicas == 1:
            mode = " (dry run)" if settings.dry_run else ""
            where = f" under {settings.subject_prefix}" if settings.subject_prefix else ""
            click.echo(f"running {agent_cls.name}{mode} on {url}{where}", err=True)
            ok = asyncio.run(_serve(agent_cls, url, settings))
            if not ok:
                raise SystemExit(3)
            return
        _run_replicas(name, url, replicas, ctx.find_root().params.get("log_level"), shadow=shadow)


def _use_identity(agent: str, creds: Path | None, tls_ca: Path | None) -> None:
    """The agent's own nkey seed and the CA, as variables that Bus.connect (and replicas) read; paths only."""
    creds_dir = os.environ.get(CREDS_DIR_ENV)
    if creds is None and creds_dir:  # a replica of `swarm up --secure`: its agent's seed in the swarm's creds
        creds = Path(creds_dir) / f"{agent}.nk"
    if creds is not None:
        if not creds.is_file():
            raise ConfigError(f"no nkey seed file for {agent} at {creds}: write them with 'busagents swarm secure'")
        os.environ[NKEY_SEED_FILE_ENV] = str(creds.absolute())
    if tls_ca is not None:
        os.environ[TLS_CA_ENV] = str(tls_ca.absolute())


def _schedule(agent_cls: type[Agent], scheduling: str | None) -> None:
    """Apply ``BUSAGENTS_SCHEDULING`` to this process (``auto``: batch unless the agent is interactive)."""
    if scheduling is None:
        return
    policy = ("normal" if agent_cls.interactive else "batch") if scheduling == "auto" else scheduling
    if not set_scheduling(policy):
        log.info("scheduling %s is not available here; %s keeps the OS's default", policy, agent_cls.name)


def _replica_env(http_port: int | None, index: int) -> dict[str, str]:
    """A replica's environment: its own ``/healthz`` port (``http_port + index``; 0 stays 0, any free one)."""
    env = dict(os.environ)
    if http_port:
        env["BUSAGENTS_HTTP_PORT"] = str(http_port + index)
    return env


async def _serve(agent_cls: type[Agent], url: str, settings: Settings) -> bool:
    collect_young_less_often(settings.gc_threshold)  # before the agent builds its start-up state
    telemetry = configure_from_env(service_name=agent_cls.name)
    bus = await Bus.connect(
        url,
        name=agent_cls.name,
        inbox_prefix=inbox_prefix(agent_cls.name),  # what ``busagents swarm permissions`` allows it
        telemetry=telemetry,
        replicas=settings.replicas,
        ack_wait=settings.ack_wait,
        max_deliver=settings.max_deliver,
        prefix=settings.subject_prefix,
        dry_run=settings.dry_run,
    )
    stop = asyncio.Event()  # SIGTERM/SIGINT, or the connection closed for good

    async def lost() -> None:
        stop.set()

    bus.on_closed(lost)
    try:
        worker = Worker(
            [agent_cls()],
            bus,
            drain_timeout=settings.drain_timeout,
            heartbeat_interval=settings.heartbeat_interval,
            conversation_log=conversation_log(settings),
            freeze_gc=True,
        )
        health = None
        if settings.http_port is not None:  # imported only then: aiohttp and the exporter take a while
            from ..health import HealthServer

            health = HealthServer(worker, host=settings.http_host, port=settings.http_port)
            await health.start()
            click.echo(f"{agent_cls.name}: /healthz and /metrics on {health.url}", err=True)
        try:
            drained = await worker.serve(stop)
        finally:
            if health is not None:
                await health.stop()
        if bus.lost is not None:  # alive but deaf helps nobody: exit, and let the supervisor start us again
            raise ConnectionLostError(f"agent {agent_cls.name} stops: {bus.lost}")
        return drained
    finally:
        await bus.close()
        if telemetry is not None:
            shutdown_telemetry()


def _run_replicas(name: str, url: str, replicas: int, log_level: str | None, *, shadow: bool = False) -> None:
    level = ["--log-level", log_level] if log_level else []
    cmd = [sys.executable, "-m", "busagents", *level, "run", name, "--nats", url, "--replicas", "1"]
    cmd += ["--shadow"] if shadow else []
    port = Settings().http_port
    children = [
        # its own session: a terminal's Ctrl-C reaches this process only, which asks each replica once to drain
        subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent(), env=_replica_env(port, i))
        for i in range(replicas)
    ]
    click.echo(f"started {replicas} replicas of {name}: pids {[c.pid for c in children]}", err=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    if any(codes):
        raise SystemExit(max(abs(c) for c in codes))
