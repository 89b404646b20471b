"""Where the CLI finds NATS: the configured URL, the default local one, or an embedded server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from ..errors import NatsUnavailableError
from ..server import NatsServer, check_nats_url, is_reachable

DEFAULT_URL = "nats://127.0.0.1:4222"


@contextmanager
def nats_url(configured: str | None, *, embedded: bool = False, quiet: bool = False) -> Iterator[str]:
    """Yield a NATS URL: ``configured`` (must be reachable), else embedded or the local default."""
    if configured:
        check_nats_url(configured)
        if not is_reachable(configured):
            raise NatsUnavailableError(f"no NATS reachable at {configured}")
        yield configured
        return
    if not embedded and is_reachable(DEFAULT_URL):
        yield DEFAULT_URL
        return
    with NatsServer() as server:
        if not quiet:
            click.echo(f"started embedded nats-server on {server.url} (JetStream in {server.store_dir})", err=True)
        yield server.url
