"""Child processes that do not outlive the busagents process that started them.

On Linux a child is asked to receive SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``),
so a SIGKILLed ``swarm up`` or ``run --replicas`` does not leave its replicas and embedded
nats-server running under PID 1; SIGTERM lets replicas drain as on a normal stop.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["SCHEDULING", "check_scheduling", "die_with_parent", "pid_alive", "set_scheduling", "with_scheduling"]

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the running program's symbols, libc's among them
    except OSError:
        return None
    prctl: Callable[..., int] | None = getattr(libc, "prctl", None)
    return prctl


_PRCTL = _prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies, or None.

    Linux only: elsewhere (macOS, Windows) it returns None and children may outlive a killed
    parent. The kernel sends ``sig`` when the *thread* that forked exits, so it also returns None
    when called off the main thread (a child would otherwise die with a short-lived worker thread).
    """
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = _PRCTL
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec; the setting survives exec.
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will send sig, so exit now
            os._exit(128 + int(sig))

    return preexec


#: The CPU scheduling policies a process of busagents can ask for (``BUSAGENTS_SCHEDULING``, swarm.toml).
SCHEDULING = ("normal", "batch")


def check_scheduling(policy: str) -> str:
    """``policy`` if it is one of :data:`SCHEDULING`; else a ValueError that lists them."""
    if policy not in SCHEDULING:
        raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}, not {policy!r}")
    return policy


def set_scheduling(policy: str) -> bool:
    """Give the calling thread, and the threads and processes it starts from now on, ``policy``.

    ``"normal"`` is the OS's default (``SCHED_OTHER``). ``"batch"`` is Linux's ``SCHED_BATCH``: the
    same share of the CPU, but a thread woken by a message does not preempt the one running, so on
    a machine with more busy processes than cores, messages wait for their reader's turn and are
    read in batches, with fewer context switches. Any user may ask for either. Returns False where
    the OS has no such policy (not Linux) and nothing changed.
    """
    value = getattr(os, "SCHED_BATCH" if check_scheduling(policy) == "batch" else "SCHED_OTHER", None)
    if value is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, value, os.sched_param(0))
    except OSError:
        return False
    return True


def with_scheduling(policy: str | None, preexec: Callable[[], None] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that gives the child ``policy`` (see :func:`set_scheduling`; None: this process's,
    which a child inherits anyway), then runs ``preexec``."""
    if policy is None:
        return preexec
    check_scheduling(policy)

    def scheduled() -> None:
        set_scheduling(policy)
        if preexec is not None:
            preexec()

    return scheduled


def pid_alive(pid: int) -> bool:
    """True when a process with this pid runs (one we may not signal counts; a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"  # exited, not yet reaped
    except (OSError, IndexError):
        return True  # no procfs (not Linux) or it vanished just now: assume it runs
