"""Which NATS a command uses, and why: one rule for every command.

1. ``--nats URL`` (the command line), then
2. ``BUSAGENTS_NATS_URL``, then
3. a URL the command's own file names (``nats_url`` in a swarm file), then
4. the development server busagents started and recorded (``busagents server start``,
   see :mod:`busagents.devserver`), then
5. an embedded nats-server for this command only, for the commands that can run on one
   (``run``, ``swarm up``, ``demo``); the others stop with an error saying how to get a server.

A server that merely answers on the default local port (``nats://127.0.0.1:4222``) but was not
started by busagents is never used unless named by 1-3: it is mentioned, so the user knows.
The API::

    with use_nats(flag, embed=True, say=print_to_stderr) as url:   # the one line, then the URL
        ...
    found = locate(flag)     # Located(url, why) or None, without starting anything
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from . import devserver
from .errors import NatsUnavailableError
from .process import pid_alive
from .server import NatsServer, check_nats_url, is_reachable
from .settings import data_dir

__all__ = ["LOCAL_URL_ENV", "NATS_URL_ENV", "Located", "locate", "no_server_error", "use_nats"]

NATS_URL_ENV = "BUSAGENTS_NATS_URL"
#: Where a NATS not started by busagents usually answers; only mentioned, never used unless named.
#: The variable exists so tests can put a stand-in for it on another port.
LOCAL_URL_ENV = "BUSAGENTS_LOCAL_NATS_URL"
_LOCAL_URL = "nats://127.0.0.1:4222"


class Located(NamedTuple):
    """A NATS URL and why it was chosen (the text after the URL in the "nats:" line)."""

    url: str
    why: str


def locate(
    flag: str | None = None,
    *,
    flag_source: str = "--nats",
    named: tuple[str, str] | None = None,
    data: Path | None = None,
) -> Located | None:
    """The NATS to use without starting one: rules 1-4 above, or None.

    ``flag_source`` says where ``flag`` came from (``BUSAGENTS_NATS_URL`` when click read the
    option from the environment); ``named`` is (url, where) of rule 3. A named server must be
    reachable (NatsUnavailableError otherwise); so must a recorded one, or it is passed over.
    """
    env = os.environ.get(NATS_URL_ENV) or None
    for url, where in ((flag, flag_source), (env, NATS_URL_ENV), named or (None, "")):
        if url:
            check_nats_url(url)
            if not is_reachable(url):
                raise NatsUnavailableError(f"no NATS reachable at {url} (from {where})")
            return Located(url, f"from {where}")
    record = devserver.recorded(data or data_dir())
    if record is not None and record.running:
        return Located(record.url, record.describe())
    return None


@contextmanager
def use_nats(
    flag: str | None = None,
    *,
    embed: bool,
    say: Callable[[str], None],
    flag_source: str = "--nats",
    named: tuple[str, str] | None = None,
    data: Path | None = None,
    scheduling: str | None = None,
) -> Iterator[str]:
    """Yield the URL to use, after ``say``-ing the one "nats: URL (why)" line.

    With nothing found (:func:`locate`), ``embed`` starts an embedded server for the ``with``
    block (stopped when it ends), with that CPU ``scheduling`` (None: this process's); without it,
    raises :func:`no_server_error`.
    """
    found = locate(flag, flag_source=flag_source, named=named, data=data)
    if found is not None:
        say(f"nats: {found.url} ({found.why})")
        yield found.url
        return
    if not embed:
        raise no_server_error(data)
    with NatsServer(scheduling=scheduling) as server:
        say(f"nats: embedded nats-server on {server.url} for this command only ({_nothing_found(data)})")
        yield server.url


def no_server_error(data: Path | None = None) -> NatsUnavailableError:
    """Nothing to connect to: what was looked for, and how to get a server."""
    return NatsUnavailableError(
        f"no NATS to use ({_nothing_found(data)}): start one with 'busagents server start' "
        "(dead letters and state then persist between runs), or name one with --nats URL or BUSAGENTS_NATS_URL"
    )


def _nothing_found(data: Path | None) -> str:
    record = devserver.recorded(data or data_dir())
    if record is None:
        server = "no busagents server running"
    elif pid_alive(record.pid):
        server = f"the busagents server recorded in {record.data_dir} does not answer at {record.url}"
    else:
        server = f"the busagents server recorded in {record.data_dir} is gone (pid {record.pid}): a stale record"
    foreign = os.environ.get(LOCAL_URL_ENV) or _LOCAL_URL
    unused = f"; the NATS at {foreign} was not started by busagents: name it to use it" if is_reachable(foreign) else ""
    return f"no --nats, no {NATS_URL_ENV}, {server}{unused}"
