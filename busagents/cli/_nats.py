"""The CLI's side of :mod:`busagents.locate`: the ``--nats`` option and the "nats: URL (why)" line.

Every command that talks to NATS takes ``@nats_option`` and opens ``with nats_url(nats) as url``
(``embed=True`` for commands that can run on an embedded server of their own); the line goes to
stderr, and a missing server is a clear error, not a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from click.core import ParameterSource

from ..locate import NATS_URL_ENV, use_nats

__all__ = ["nats_option", "nats_url"]

nats_option = click.option(
    "--nats",
    "nats",
    envvar=NATS_URL_ENV,
    show_envvar=True,
    help="NATS URL (default: the busagents server if running; see 'busagents server').",
)


@contextmanager
def nats_url(
    flag: str | None, *, embed: bool = False, named: tuple[str, str] | None = None, scheduling: str | None = None
) -> Iterator[str]:
    """Yield the URL this command uses (see :func:`busagents.locate.use_nats`), saying which and why."""
    with use_nats(flag, embed=embed, say=_say, flag_source=_flag_source(), named=named, scheduling=scheduling) as url:
        yield url


def _say(text: str) -> None:
    click.echo(text, err=True)


def _flag_source() -> str:
    """``--nats`` or, when click read the option from the environment, the variable's name."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.get_parameter_source("nats") is ParameterSource.ENVIRONMENT:
        return NATS_URL_ENV
    return "--nats"
