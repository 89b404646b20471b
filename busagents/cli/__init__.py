"""The ``busagents`` command line: one module per command group.

Plugins add commands of their own through the ``busagents.commands`` entry-point group (a
:class:`click.Command`; the flight app's ``busagents chat``), loaded only when asked for by name,
so they cost nothing to the other commands. ``nats_option`` and ``nats_url`` are theirs to use.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points

import click
import pydantic

from ..errors import BusagentsError
from ._nats import nats_option, nats_url
from .agents import agents_group, run_command
from .contracts import publish_command, request_command
from .demo import demo_command
from .dlq import dlq_group
from .llm import llm_group
from .lock import contracts_group
from .new import new_command
from .ps import ps_command
from .replay import replay_command, shadow_group
from .server import server_group
from .swarm import swarm_group
from .trace import trace_command
from .watch import watch_command

__all__ = ["cli", "main", "nats_option", "nats_url"]

COMMANDS_GROUP = "busagents.commands"

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _WithPlugins(click.Group):
    """The built-in commands, then the ones plugins declare in the ``busagents.commands`` group."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *(ep.name for ep in entry_points(group=COMMANDS_GROUP))})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command  # a plugin cannot replace a built-in command
        for ep in entry_points(group=COMMANDS_GROUP, name=name):
            loaded = ep.load()
            if not isinstance(loaded, click.Command):
                raise click.ClickException(f"plugin command {name!r} ({ep.value}) is not a click command")
            return loaded
        return None


@click.group(cls=_WithPlugins, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    envvar="BUSAGENTS_LOG_LEVEL",
    show_envvar=True,
    default="WARNING",
    show_default=True,
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    help="Python logging level; replicas started by 'run --replicas' and 'swarm up' get it too.",
)
@click.version_option(package_name="busagents")
def cli(log_level: str) -> None:
    """busagents: event-driven AI agents over NATS with typed contracts."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


cli.add_command(agents_group)
cli.add_command(contracts_group)
cli.add_command(run_command)
cli.add_command(demo_command)
cli.add_command(dlq_group)
cli.add_command(llm_group)
cli.add_command(new_command)
cli.add_command(ps_command)
cli.add_command(publish_command)
cli.add_command(replay_command)
cli.add_command(request_command)
cli.add_command(server_group)
cli.add_command(shadow_group)
cli.add_command(swarm_group)
cli.add_command(trace_command)
cli.add_command(watch_command)


def main() -> None:
    """Console entry point: user mistakes print a message, not a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except BusagentsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except pydantic.ValidationError as exc:  # settings from the environment (BUSAGENTS_...) that do not fit
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            click.echo(f"error: invalid {exc.title} {field}={error.get('input')!r}: {error['msg']}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
