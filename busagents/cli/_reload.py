"""``busagents run --reload``: for development, the agent process starts again when its source changes."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
import watchfiles

from ..agent import Agent
from ..contract import contract_info
from ..process import die_with_parent

__all__ = ["run_reloading", "source_dirs"]

_FRAMEWORK = Path(__file__).resolve().parents[1]


def source_dirs(agent_cls: type[Agent]) -> list[Path]:
    """The directories to watch: the agent's package (or its module's directory) and its contracts'.

    Installed third-party code and busagents itself are left out: they do not change while you work.
    """
    classes: list[type[Any]] = [agent_cls, *agent_cls.consumes(), *agent_cls.produces, *agent_cls.awaits]
    dirs: dict[Path, None] = {}
    for cls in classes:
        if cls is not agent_cls:
            cls = contract_info(cls).cls
        top = sys.modules.get(cls.__module__.partition(".")[0])
        paths = [Path(p) for p in getattr(top, "__path__", [])]  # a package: all of it
        if not paths and top is not None and getattr(top, "__file__", None):
            paths = [Path(str(top.__file__)).parent]  # a top-level module: its directory
        for path in paths:
            path = path.resolve()
            if path == _FRAMEWORK or "site-packages" in path.parts or not path.is_dir():
                continue
            dirs[path] = None
    return list(dirs)


def run_reloading(cmd: list[str], paths: list[Path], *, label: str, drain_timeout: float) -> int:
    """Run ``cmd`` until SIGTERM/SIGINT, stopping it (SIGTERM: it drains) and starting it again on each
    change of a ``.py`` file under ``paths``. Returns how many times it was restarted.
    """
    if not paths:
        raise click.UsageError(f"--reload: found no source directory of {label} to watch")
    watched = ", ".join(str(p) for p in paths)
    click.echo(f"--reload: watching {watched}; {label} restarts when a .py file there changes", err=True)
    # SIGTERM ends the watch as Ctrl-C does; and Ctrl-C does even where it was inherited ignored (a
    # shell's background job: Python then installs no KeyboardInterrupt), as for busagents' other commands
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    logging.getLogger("watchfiles").setLevel(logging.ERROR)  # not a WARNING for the Ctrl-C that stops it
    process = _start(cmd)
    restarts = 0
    try:
        for changes in watchfiles.watch(*paths, watch_filter=watchfiles.PythonFilter(), raise_interrupt=False):
            files = sorted({Path(path).name for _, path in changes})
            click.echo(f"--reload: {', '.join(files)} changed; restarting {label}", err=True)
            _stop(process, drain_timeout)
            process = _start(cmd)
            restarts += 1
    finally:
        _stop(process, drain_timeout)
    return restarts


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _start(cmd: list[str]) -> subprocess.Popen[bytes]:
    # its own session: a terminal's Ctrl-C reaches this process only, which asks the agent once to drain
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die_with_parent())


def _stop(process: subprocess.Popen[bytes], drain_timeout: float) -> None:
    """SIGTERM (the agent drains), SIGKILL only when it is still there after the drain timeout."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(drain_timeout + 5)
    except subprocess.TimeoutExpired:
        click.echo(f"--reload: the agent did not stop within {drain_timeout + 5:.0f}s; killing it", err=True)
        process.kill()
        process.wait()
