"""``busagents server start|status|stop``: the development server every command finds.

See :mod:`busagents.devserver`: a detached nats-server with JetStream in the data directory,
recorded there, so dead letters and state survive between runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import devserver
from ..process import pid_alive
from ..settings import DATA_DIR_ENV, data_dir

data_dir_option = click.option(
    "--data-dir",
    "data",
    envvar=DATA_DIR_ENV,
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the server keeps JetStream data and its record (default: the per-user data directory).",
)


@click.group("server")
def server_group() -> None:
    """The busagents development server: one local NATS that every command uses."""


@server_group.command("start")
@data_dir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Port on 127.0.0.1 (default: a free one).")
def start_command(data: Path | None, port: int) -> None:
    """Start the server in the background (it keeps running after this command) and record it."""
    where = data_dir(data)
    before = devserver.recorded(where)
    if before is not None and before.running:
        click.echo(f"already running: {before.url} (pid {before.pid}, {before.describe()})")
        return
    if before is not None:
        click.echo(f"replacing a stale record: the server with pid {before.pid} is gone", err=True)
    server = devserver.start(where, port=port or None)
    click.echo(f"started: {server.url} (pid {server.pid}, {server.describe()})")
    click.echo(f"every busagents command now uses it; stop it with 'busagents server stop' (log: {server.log})")


@server_group.command("status")
@data_dir_option
def status_command(data: Path | None) -> None:
    """Say whether the server is up (exit 0) or not (exit 1)."""
    where, server = _recorded(data)
    if server is None:
        sys.exit(1)
    if server.running:
        click.echo(f"running: {server.url} (pid {server.pid}, {server.describe()})")
        return
    state = "does not answer" if pid_alive(server.pid) else "is gone: a stale record"
    click.echo(f"not running: the server recorded in {where} (pid {server.pid}, {server.url}) {state}")
    sys.exit(1)


@server_group.command("stop")
@data_dir_option
def stop_command(data: Path | None) -> None:
    """Stop the server (its data stays in the data directory for the next start)."""
    where, server = _recorded(data)
    if server is None:
        return
    running = server.running
    devserver.stop(where)
    if running:
        click.echo(f"stopped: {server.url} (pid {server.pid}); data kept in {server.data_dir}")
    else:
        click.echo(f"not running: removed a stale record (pid {server.pid} is gone); data kept in {server.data_dir}")


def _recorded(data: Path | None) -> tuple[Path, devserver.DevServer | None]:
    """The data directory and the server recorded there; without one, says so."""
    where = data_dir(data)
    server = devserver.recorded(where)
    if server is None:
        click.echo(f"not running (no server recorded in {where})")
    return where, server
