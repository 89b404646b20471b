"""The development server: one nats-server that busagents starts, records, and finds again.

``busagents server start`` runs nats-server detached (its own session, it outlives the
command) with JetStream in the data directory (:func:`busagents.settings.data_dir`), so
dead letters, durable messages and key-value state survive between runs and restarts.
The record, ``server.json`` in that directory, holds its URL, pid, data directory and start
time; every command that needs NATS finds the server through it (see :mod:`busagents.locate`)::

    server = start(data_dir())       # DevServer(url=..., pid=..., ...)
    recorded(data_dir())             # the record, running or not (.running says which)
    stop(data_dir())                 # SIGTERM, wait for the exit, remove the record
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import msgspec

from .errors import NatsUnavailableError
from .process import pid_alive
from .server import NatsServer, is_reachable

__all__ = ["DevServer", "recorded", "start", "stop"]

RECORD = "server.json"
STORE = "nats"  # nats-server's JetStream store (and its log), under the data directory


class DevServer(msgspec.Struct, kw_only=True):
    """What ``server.json`` records about the development server."""

    url: str
    pid: int
    data_dir: str
    started: float  # Unix time

    @property
    def running(self) -> bool:
        """Its process runs and it accepts connections (a record whose pid is gone is stale)."""
        return pid_alive(self.pid) and is_reachable(self.url)

    @property
    def log(self) -> Path:
        return Path(self.data_dir) / STORE / "nats-server.log"

    def describe(self) -> str:
        """``started 19:20, data in ~/.local/share/busagents``: for the "which NATS" line."""
        when = time.strftime("%H:%M", time.localtime(self.started))
        return f"busagents server, started {when}, data in {_home(self.data_dir)}"


def recorded(data_dir: Path) -> DevServer | None:
    """The development server recorded in ``data_dir``, running or not; None without a record."""
    try:
        return msgspec.json.decode((data_dir / RECORD).read_bytes(), type=DevServer)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError):
        return None  # unreadable or half written: as good as none; ``start`` writes a new one


def start(data_dir: Path, *, port: int | None = None, timeout: float = 20.0) -> DevServer:
    """Start the development server (or return the one already running) and record it."""
    current = recorded(data_dir)
    if current is not None and current.running:
        return current
    server = NatsServer(port=port, store_dir=data_dir / STORE, detached=True)
    try:
        server.start(timeout)
    except NatsUnavailableError as exc:
        fatal = [line for line in server.log_tail(50).splitlines() if "[FTL] " in line or "[ERR] " in line]
        why = fatal[-1].split("] ", 2)[-1] if fatal else str(exc)  # the server's own words, not its banner
        raise NatsUnavailableError(
            f"the busagents server did not start: {why} (log: {data_dir / STORE / 'nats-server.log'})"
        ) from None
    assert server.process is not None
    record = DevServer(url=server.url, pid=server.process.pid, data_dir=str(data_dir), started=time.time())
    written = data_dir / f".{RECORD}.tmp"
    written.write_bytes(msgspec.json.encode(record))
    written.replace(data_dir / RECORD)  # a reader sees the old record or the new one, never half of one
    return record


def stop(data_dir: Path, *, timeout: float = 20.0) -> DevServer | None:
    """Stop the recorded server (SIGTERM: JetStream flushes its store; SIGKILL after ``timeout``)
    and remove the record. Returns the record (None if there was none); a stale one is just removed."""
    record = recorded(data_dir)
    if record is None:
        return None
    if pid_alive(record.pid) and _is_nats_server(record.pid):
        os.kill(record.pid, signal.SIGTERM)
        if not _exited(record.pid, timeout):
            os.kill(record.pid, signal.SIGKILL)
            _exited(record.pid, 5.0)
    with contextlib.suppress(FileNotFoundError):
        (data_dir / RECORD).unlink()
    return record


def _is_nats_server(pid: int) -> bool:
    """The pid is still a nats-server (not a process that got the pid of one long gone)."""
    try:
        return b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs (not Linux): trust the record


def _exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (not our child: its starter has exited) is gone; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _home(path: str) -> str:
    home = str(Path.home())
    return "~" + path[len(home) :] if path == home or path.startswith(home + os.sep) else path
