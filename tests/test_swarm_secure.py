"""``busagents swarm secure`` + ``swarm up --secure``: the flight swarm through a day on a locked-down server.

A real nats-server started from the generated configuration (TLS required, one nkey user per
agent, an operator user, nobody anonymous); the swarm runs with ``swarm up --secure`` (each
replica its own seed), the operator watches the day until every affected passenger is notified.
Then, on that server: an anonymous client, a plain-TCP client, each agent's undeclared publish and
subscribe, and the operator's travel command are refused; the operator lists the dead letters;
and no seed or private key appears in anything the run wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import psutil
import pytest
from busagents_flight.data import generate
from busagents_flight.feed import status_feed
from busagents_travel import RebookPassenger

from busagents import Bus
from busagents.contract import contract_info
from busagents.dlq import DLQ_STREAM
from busagents.envelope import MSG_ID
from busagents.server import NatsServer, free_port
from busagents.swarm.graph import inbox_prefix
from busagents.swarm.secure import OPERATOR

from .flight_swarm import flight_env
from .test_swarm_permissions import _Progress, _watch

ROOT = Path(__file__).resolve().parent.parent
SWARM = ROOT / "deploy" / "flight-swarm.toml"
FLIGHTS, PASSENGERS, SEED = 40, 3000, 7


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "busagents", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def _forbidden_publish(own: list[str], everyone: list[str]) -> str:
    """A subject another agent may publish on and this one may not (a sample of its undeclared publishes)."""
    for pattern in everyone:
        subject = pattern.replace(">", "x").replace("*", "x")
        if not pattern.startswith("$") and not any(_matches(p, subject) for p in own):
            return subject
    raise AssertionError("every subject is granted")


class _Violations:
    """The permission violations a connection is told about (nats-py's error callback)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc).lower())
            self.changed.set()

    async def wait(self, count: int) -> list[str]:
        async with asyncio.timeout(10):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.seen


async def _connect(url: str, tls: ssl.SSLContext, seed: Path, name: str, violations: _Violations) -> Bus:
    return await Bus.connect(
        url, name=name, nkeys_seed=str(seed), tls=tls, inbox_prefix=inbox_prefix(name), error_cb=violations.on_error
    )


def _swarm_up(out: Path, data: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return _swarm_up_file(SWARM, out, data, env, log)


def _swarm_up_file(
    swarm: Path, out: Path, data: Path, env: dict[str, str], log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "busagents", "--log-level", "INFO", "swarm", "up", str(swarm), *extra]
    with log.open("wb") as sink:
        return subprocess.Popen(
            [*cmd, "--secure", str(out), "--data-dir", str(data)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _files_written(tmp: Path, out: Path) -> list[str]:
    """The text of every file under ``tmp`` but the seeds and private keys themselves (and the booking store)."""
    secret_files = {*(out / "creds").glob("*.nk"), *(out / "keys").glob("*-key.pem")}
    return [
        path.read_text(errors="replace")
        for path in tmp.rglob("*")
        if path.is_file() and path not in secret_files and path.suffix != ".sqlite3"
    ]


def _secrets(out: Path) -> list[str]:
    """Every seed and the body of every private key under ``out``."""
    found = [p.read_text().strip() for p in (out / "creds").glob("*.nk")]
    for key in (out / "keys").glob("*-key.pem"):
        found += [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    return found


async def test_the_flight_swarm_runs_secured_and_the_server_refuses_what_is_not_granted(tmp_path: Path) -> None:
    out, port = tmp_path / "secure", free_port()
    made = _cli("swarm", "secure", str(SWARM), "-o", str(out), "--port", str(port))
    assert made.returncode == 0, made.stderr
    seeds = sorted((out / "creds").glob("*.nk"))
    agents = json.loads((out / "secure.json").read_text())["agents"]
    assert {p.stem for p in seeds} == {*agents, OPERATOR} and len(agents) == 7
    for private in [*seeds, *(out / "keys").glob("*-key.pem")]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    for folder in (out / "creds", out / "keys"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    conf = (out / "nats-server.conf").read_text()
    assert "no_auth_user" not in conf and "password" not in conf
    perms = json.loads(_cli("swarm", "permissions", str(SWARM)).stdout)

    tls = ssl.create_default_context(cafile=str(out / "keys" / "ca.pem"))
    env = {
        **flight_env(tmp_path, FLIGHTS, PASSENGERS, SEED),
        "BUSAGENTS_FLIGHT_DAY_SECONDS": "0",
        "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2",
    }
    env.pop("BUSAGENTS_NATS_URL", None)
    updates = len(status_feed(generate(FLIGHTS, PASSENGERS, SEED)))
    server = NatsServer(port=port, config_file=out / "nats-server.conf", store_dir=out / "jetstream", jetstream=False)
    async with server:
        url = server.url
        watched = _Violations()
        operator = await _connect(url, tls, out / "creds" / f"{OPERATOR}.nk", OPERATOR, watched)
        progress = _Progress(updates)
        subs = await _watch(operator, progress)  # the operator may read every subject
        log = tmp_path / "swarm.log"
        data = tmp_path / "data"
        up = _swarm_up(out, data, env, log)
        op_env = {
            **env,
            "BUSAGENTS_NKEY_SEED_FILE": str(out / "creds" / f"{OPERATOR}.nk"),
            "BUSAGENTS_TLS_CA": str(out / "keys" / "ca.pem"),
        }
        cmdlines: list[str] = []
        try:
            try:
                await asyncio.wait_for(progress.done.wait(), 120)
            except TimeoutError:
                pytest.fail(
                    f"not finished: {progress.status}/{updates} updates, {progress.assessed}/{progress.disruptions} "
                    f"assessed, {len(progress.notified)}/{progress.affected} notified\n"
                    f"{server.log_tail(40)}\n{log.read_text(errors='replace')[-6000:]}"
                )
            for child in psutil.Process(up.pid).children(recursive=True):  # what `ps` shows of the replicas
                cmdlines.append(" ".join(child.cmdline()))
            shown = _cli("ps", "--nats", url, env={**op_env, "COLUMNS": "200"})  # the operator sees the swarm
            assert shown.returncode == 0 and "flight-rebooker" in shown.stdout, shown.stderr
            for sub in subs:
                await sub.unsubscribe()
        finally:
            up.terminate()
            up.wait(60)
        assert up.returncode == 0, log.read_text(errors="replace")[-4000:]
        assert progress.dead_letters == []
        assert len(progress.notified) == progress.affected > 0
        assert len(cmdlines) >= 13  # every replica of the flight swarm ran
        server_log = server.log_tail(1_000_000)
        assert "violation" not in server_log.lower(), server_log[-4000:]

        # an anonymous client (TLS, no key) is refused
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(url, tls=tls, allow_reconnect=False, connect_timeout=3, max_reconnect_attempts=0)
        # a plain-TCP client is told TLS is required and gets no PONG
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        info = json.loads((await reader.readline()).split(b" ", 1)[1])
        assert info["tls_required"] is True
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1000), 10)
        assert b"PONG" not in answer
        writer.close()

        # each agent's undeclared publish and subscribe are refused (with its own seed)
        everyone = sorted({s for p in perms.values() for s in p["publish"]})
        for name in agents:
            violations = _Violations()
            bus = await _connect(url, tls, out / "creds" / f"{name}.nk", name, violations)
            try:
                subject = _forbidden_publish(perms[name]["publish"], everyone)
                other = next(a for a in agents if a != name)
                await bus.nc.publish(subject, b"{}")
                await bus.nc.subscribe(f"{inbox_prefix(other)}.>")
                await bus.flush()
                seen = await violations.wait(2)
                assert any(f'publish to "{subject.lower()}"' in v for v in seen), seen
                assert any(f'subscription to "{inbox_prefix(other).lower()}.>"' in v for v in seen), seen
                if name == "flight-notifier":  # an agent may dead-letter: one letter for the operator to list
                    ack = await bus.js.publish(f"busagents.dlq.{name}", b"{}", timeout=5, headers={MSG_ID: "s1"})
                    assert ack.stream == DLQ_STREAM
            finally:
                await bus.close()

        # the operator lists dead letters, but may not command a rebooking
        listed = _cli("dlq", "list", "--nats", url, env=op_env)
        assert listed.returncode == 0, listed.stderr
        assert "flight-notifier" in listed.stdout, listed.stdout
        rebook = contract_info(RebookPassenger).subject
        await operator.nc.publish(f"{rebook}.B1", b"{}")
        await operator.flush()
        assert any(f'publish to "{rebook.lower()}.b1"' in v for v in await watched.wait(1)), watched.seen
        await operator.close()
        server_log = server.log_tail(1_000_000)

    # no seed nor private key in anything the run wrote
    docs = _cli("swarm", "docs", str(SWARM), "-o", str(tmp_path / "docs"))
    assert docs.returncode == 0, docs.stderr
    written = [made.stdout, made.stderr, listed.stdout, listed.stderr, docs.stdout, docs.stderr, server_log]
    written += [shown.stdout, shown.stderr]
    written += cmdlines
    written += _files_written(tmp_path, out)
    assert len(written) > 10
    everything = "\n".join(written)
    assert "asyncapi" in everything.lower()
    for secret in _secrets(out):
        assert secret not in everything
    assert not re.search(r"\bSU[A-Z2-7]{56}\b", everything)  # no user seed of any kind
    assert os.environ.get("BUSAGENTS_NKEY_SEED_FILE") is None  # the test process never took an identity


async def test_swarm_up_secure_starts_the_servers_configuration_and_each_agent_takes_its_own_seed(
    tmp_path: Path,
) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text("[agents.flight-notifier]\n")
    out, port = tmp_path / "secure", free_port()
    assert _cli("swarm", "secure", str(swarm), "-o", str(out), "--port", str(port)).returncode == 0
    missing = _cli("swarm", "up", str(swarm), "--secure", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "busagents swarm secure" in missing.stderr
    assert "Traceback" not in missing.stderr
    env = {**flight_env(tmp_path), "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2"}
    env.pop("BUSAGENTS_NATS_URL", None)
    cmd = [sys.executable, "-m", "busagents", "--log-level", "INFO", "swarm", "up", str(swarm), "--force"]
    up = await asyncio.create_subprocess_exec(  # --force: nobody feeds the notifier here
        *cmd, "--secure", str(out), "--data-dir", str(tmp_path / "data"),
        env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    started = asyncio.Event()  # `swarm up` says when its secured server is up

    async def read(stream: asyncio.StreamReader) -> None:
        while line := (await stream.readline()).decode(errors="replace"):
            lines.append(line)
            if line.startswith(f"started the secured nats-server of {out}"):
                started.set()

    assert up.stdout is not None
    reader = asyncio.create_task(read(up.stdout))
    waiting = asyncio.create_task(started.wait())
    try:
        await asyncio.wait([reader, waiting], timeout=30, return_when="FIRST_COMPLETED")
        assert started.is_set(), "".join(lines)
        tls = ssl.create_default_context(cafile=str(out / "keys" / "ca.pem"))
        operator = await _connect(
            f"nats://127.0.0.1:{port}", tls, out / "creds" / f"{OPERATOR}.nk", OPERATOR, _Violations()
        )
        await operator.wait_for_agents(["flight-notifier"], timeout=30)  # it connected with its own seed
        await operator.close()
    finally:
        waiting.cancel()
        if up.returncode is None:
            up.terminate()
        await asyncio.wait_for(up.wait(), 60)
        await asyncio.wait_for(reader, 10)
    text = "".join(lines)
    assert up.returncode == 0, text
    assert f"started the secured nats-server of {out}" in text
    assert "violation" not in (out / "jetstream" / "nats-server.log").read_text().lower()
    assert not re.search(r"\bSU[A-Z2-7]{56}\b", text)


def test_secure_takes_an_existing_certificate_and_refuses_half_of_one_and_run_a_missing_seed(tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert _cli("swarm", "secure", str(SWARM), "-o", str(first)).returncode == 0
    cert, key, ca = (first / "keys" / n for n in ("server.pem", "server-key.pem", "ca.pem"))
    half = _cli("swarm", "secure", str(SWARM), "-o", str(tmp_path / "half"), "--tls-cert", str(cert))
    assert half.returncode == 1 and "--tls-key" in half.stderr and "Traceback" not in half.stderr
    given = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    mine = _cli("swarm", "secure", str(SWARM), "-o", str(tmp_path / "mine"), *given)
    assert mine.returncode == 0, mine.stderr
    conf = (tmp_path / "mine" / "nats-server.conf").read_text()
    assert f'key_file: "{key}"' in conf and f'ca_file: "{ca}"' in conf
    assert list((tmp_path / "mine" / "keys").iterdir()) == []  # no CA of its own
    assert json.loads((tmp_path / "mine" / "secure.json").read_text())["ca"] == str(ca)
    lost = _cli("run", "flight-notifier", "--creds", str(tmp_path / "none.nk"), "--nats", "nats://127.0.0.1:1")
    assert lost.returncode == 1 and "no nkey seed file for flight-notifier" in lost.stderr, lost.stderr
