"""Every command finds NATS the same way, and says which server it uses and why.

The session's nats-server stands in for the NATS on 127.0.0.1:4222 that busagents did not
start (``BUSAGENTS_LOCAL_NATS_URL`` points the check at it): it is used only when named.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from busagents import Bus, NatsUnavailableError, devserver
from busagents.locate import Located, locate
from busagents.server import NatsServer

from .drain_agent import child_env, exited

LINE = re.compile(r"^nats: (\S+) \((.*)\)$", re.M)


@pytest.fixture
def env(tmp_path: Path, nats_server: NatsServer) -> dict[str, str]:
    """Nothing configured, no busagents server recorded, a foreign NATS answering on the 'default' port."""
    env = child_env()
    env.pop("BUSAGENTS_NATS_URL", None)
    env["BUSAGENTS_DATA_DIR"] = str(tmp_path / "data")
    env["BUSAGENTS_LOCAL_NATS_URL"] = nats_server.url
    return env


async def busagents(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "busagents",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def said(err: str) -> tuple[str, str]:
    """The one "nats: URL (why)" line: (url, why)."""
    lines = LINE.findall(err)
    assert len(lines) == 1, err
    url, why = lines[0]
    return url, why


async def test_a_nats_not_started_by_busagents_is_not_used_unless_named(
    env: dict[str, str], nats_server: NatsServer
) -> None:
    code, _, err = await busagents("dlq", "list", env=env)
    assert code == 1, err
    assert "Traceback" not in err
    assert err.startswith(
        "error: no NATS to use (no --nats, no BUSAGENTS_NATS_URL, no busagents server running; "
        f"the NATS at {nats_server.url} was not started by busagents: name it to use it): "
        "start one with 'busagents server start'"
    ), err

    code, _, err = await busagents("llm", "approve", "r-1", env=env)
    assert code == 1 and "error: no NATS to use" in err, err


async def test_the_flag_then_the_environment_variable_name_the_server(
    env: dict[str, str], nats_server: NatsServer
) -> None:
    code, out, err = await busagents("dlq", "list", "--nats", nats_server.url, env=env)
    assert code == 0, err
    assert said(err) == (nats_server.url, "from --nats")
    assert out == "no dead letters\n"

    named = {**env, "BUSAGENTS_NATS_URL": nats_server.url}
    code, out, err = await busagents("dlq", "list", env=named)
    assert code == 0, err
    assert said(err) == (nats_server.url, "from BUSAGENTS_NATS_URL")

    code, _, err = await busagents("dlq", "list", "--nats", nats_server.url, env={**env, "BUSAGENTS_NATS_URL": "x:1"})
    assert code == 0, err
    assert said(err) == (nats_server.url, "from --nats")  # the flag wins over the variable


async def test_a_recorded_busagents_server_is_used_unless_a_server_is_named(
    env: dict[str, str], nats_server: NatsServer, tmp_path: Path
) -> None:
    server = devserver.start(tmp_path / "data")
    try:
        code, _, err = await busagents("dlq", "list", env=env)
        assert code == 0, err
        url, why = said(err)
        assert url == server.url != nats_server.url
        assert re.fullmatch(rf"busagents server, started \d\d:\d\d, data in {tmp_path / 'data'}", why), why

        code, _, err = await busagents("dlq", "list", env={**env, "BUSAGENTS_NATS_URL": nats_server.url})
        assert code == 0, err
        assert said(err) == (nats_server.url, "from BUSAGENTS_NATS_URL")
    finally:
        devserver.stop(tmp_path / "data")


async def test_run_embeds_a_server_for_itself_when_nothing_is_found(
    env: dict[str, str], nats_server: NatsServer
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "busagents", "run", "drain_agent:Slow", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode().rstrip("\n")
        embedded = re.match(r"nats: embedded nats-server on (nats://127\.0\.0\.1:\d+) ", line)
        assert embedded is not None, line
        url = embedded.group(1)
        assert url != nats_server.url
        assert line == (
            f"nats: embedded nats-server on {url} for this command only (no --nats, no BUSAGENTS_NATS_URL, "
            f"no busagents server running; the NATS at {nats_server.url} was not started by busagents: "
            "name it to use it)"
        )
        bus = await Bus.connect(url)  # the agent serves there
        try:
            await bus.wait_for_agents(["slow"], timeout=20)
        finally:
            await bus.close()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


async def test_a_stale_record_is_noticed_and_passed_over(env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = devserver.start(data)
    os.kill(server.pid, signal.SIGKILL)  # gone without a word: the record stays behind
    assert await asyncio.to_thread(exited, [server.pid]) == []
    assert not devserver.recorded(data).running  # type: ignore[union-attr]

    code, _, err = await busagents("dlq", "list", env=env)
    assert code == 1, err
    assert f"the busagents server recorded in {data} is gone (pid {server.pid}): a stale record" in err, err

    code, out, _ = await busagents("server", "status", env=env)
    assert code == 1
    assert (
        out == f"not running: the server recorded in {data} (pid {server.pid}, {server.url}) is gone: a stale record\n"
    )

    code, out, _ = await busagents("server", "stop", env=env)
    assert code == 0
    assert f"removed a stale record (pid {server.pid} is gone)" in out
    assert devserver.recorded(data) is None


def test_a_swarm_files_url_comes_after_the_flag_and_the_variable(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BUSAGENTS_NATS_URL", raising=False)
    named = (nats_server.url, "nats_url in swarm.toml")
    assert locate(None, named=named, data=tmp_path) == Located(nats_server.url, "from nats_url in swarm.toml")
    assert locate(None, data=tmp_path) is None  # nothing named, no busagents server: the caller embeds or stops
    with pytest.raises(NatsUnavailableError, match=r"no NATS reachable at nats://127\.0\.0\.1:1 \(from --nats\)"):
        locate("nats://127.0.0.1:1", named=named, data=tmp_path)
    monkeypatch.setenv("BUSAGENTS_NATS_URL", "nats://127.0.0.1:1")
    with pytest.raises(NatsUnavailableError, match=r"\(from BUSAGENTS_NATS_URL\)"):
        locate(None, named=named, data=tmp_path)
