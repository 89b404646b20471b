"""Child processes of the benchmarks: spawned from the repository root, stopped and reaped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "Child", "ShortReceive", "spawn"]

#: The repository root: children run there so ``benchmarks`` is importable.
ROOT = Path(__file__).resolve().parent.parent


class ShortReceive(RuntimeError):
    """A receiver child reported fewer messages than it was sent (its ``error`` result)."""


class Child:
    """A running child process that speaks ``READY`` / ``RESULT {json}`` lines on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, argv: list[str], stderr: Path) -> None:
        self.proc = proc
        self.argv = argv
        self.stderr = stderr

    def failure(self, what: str) -> RuntimeError:
        tail = "\n".join(self.stderr.read_text(errors="replace").splitlines()[-15:]) if self.stderr.exists() else ""
        return RuntimeError(f"{' '.join(self.argv)}: {what}" + (f"\n{tail}" if tail else ""))

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _line(self, prefix: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    code = await self.proc.wait()
                    raise self.failure(f"exited with {code} before printing {prefix}")
                line = raw.decode().strip()
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()

    async def ready(self, timeout: float = 60.0) -> None:
        await self._line("READY", timeout)

    async def result(self, timeout: float = 300.0) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(await self._line("RESULT", timeout))
        await self.proc.wait()
        if "error" in data:
            failure = self.failure(data["error"])
            raise ShortReceive(*failure.args) if data.get("short") else failure
        self.stderr.unlink(missing_ok=True)
        return data

    async def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await self.proc.stdin.wait_closed()

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a busagents worker drains on it), then SIGKILL after ``timeout``."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        self.stderr.unlink(missing_ok=True)
        return self.proc.returncode


async def spawn(*args: str, stdout: bool = True) -> Child:
    """Start ``python args...`` in the repository root with this interpreter; stderr goes to a file."""
    argv = [sys.executable, *args]
    fd, stderr = tempfile.mkstemp(prefix="busagents-bench-", suffix=".stderr")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
        stderr=fd,
    )
    os.close(fd)
    return Child(proc, argv, Path(stderr))
