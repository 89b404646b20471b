"""``busagents demo``: runs the demo registered by an installed plugin (group 'busagents.demos')."""

from __future__ import annotations

from importlib.metadata import entry_points

import click

from ..errors import ConfigError
from ..plugins import DEMOS_GROUP


@click.command(
    "demo",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.option("--which", default=None, help="Name of the demo plugin (default: the only one installed).")
@click.pass_context
def demo_command(ctx: click.Context, which: str | None) -> None:
    """Run the reference demo (the flight assistant). 'busagents demo --help' for its options."""
    demos = {ep.name: ep for ep in entry_points(group=DEMOS_GROUP)}
    if not demos:
        raise ConfigError("no demo installed: install the flight assistant (pip install -e ./contracts -e ./agents)")
    if which is None:
        which = "flight" if "flight" in demos else sorted(demos)[0]
    if which not in demos:
        raise ConfigError(f"no demo named {which!r}; installed: {', '.join(sorted(demos))}")
    command = demos[which].load()
    if not isinstance(command, click.Command):
        raise ConfigError(f"demo plugin {which!r} is not a click command")
    command.main(args=ctx.args, prog_name="busagents demo", standalone_mode=False)
