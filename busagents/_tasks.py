"""Stopping tasks for good: cancel them, wait, and cancel again one that swallowed the cancel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger("busagents")


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> bool:
    """Cancel ``tasks`` and wait until they end; False when some still run after ``timeout``.

    A task may swallow a cancel and carry on: Python 3.11's ``asyncio.wait_for`` returns its
    result when the result and the cancel come together (nats-py's ``next_msg`` waits with it),
    so a task still running is cancelled again every second. What the tasks failed with is
    logged, not raised; one still running at ``timeout`` is logged and left.
    """
    tasks = list(tasks)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, running = await asyncio.wait(running, timeout=min(1.0, left))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("task %s had failed: %r", task.get_name(), task.exception())
    if running:
        log.warning("task(s) still running %.0fs after their cancel: %s", timeout, [t.get_name() for t in running])
    return not running
