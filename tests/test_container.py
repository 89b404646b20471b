"""deploy/Dockerfile and deploy/docker-compose.flight.yml, read, not built: no image is built and no
container runs in this suite (no internet at run time)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import yaml

DEPLOY = Path(__file__).parent.parent / "deploy"


def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))  # the official (Go) Dockerfile parser


def last(cmd: str) -> dockerfile.Command:
    return [c for c in instructions() if c.cmd.upper() == cmd][-1]


def test_the_image_installs_the_project_and_runs_an_agent_as_a_user() -> None:
    assert [c.value for c in instructions() if c.cmd.upper() == "FROM"] == [("python:3.11-slim",)]
    installs = [shlex.split(c.value[0]) for c in instructions() if c.cmd.upper() == "RUN"]
    pip = [words[words.index("install") + 1 :] for words in installs if words[:2] == ["pip", "install"]]
    assert {".", "./contracts", "./agents"} <= {w for args in pip for w in args}
    user = last("USER").value[0]
    assert user not in ("root", "0") and not user.startswith("0:")
    entrypoint = last("ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("busagents", "run")  # exec form: the agent gets SIGTERM
    pairs = [c.value for c in instructions() if c.cmd.upper() == "ENV"]
    env = {k: v for value in pairs for k, v in zip(value[::2], value[1::2], strict=True)}
    assert env["BUSAGENTS_HTTP_HOST"] == "0.0.0.0"


def test_the_healthcheck_is_quiet_without_a_port_and_fails_on_a_dead_one() -> None:
    check = last("HEALTHCHECK").value
    assert check[0] == "CMD"
    argv = [sys.executable, *check[2:]]  # python -c ...: with this interpreter
    unset = subprocess.run(argv, env={}, capture_output=True, timeout=30, check=False)
    assert unset.returncode == 0, unset.stderr
    dead = subprocess.run(argv, env={"BUSAGENTS_HTTP_PORT": "1"}, capture_output=True, timeout=30, check=False)
    assert dead.returncode != 0 and b"Connection refused" in dead.stderr


def test_the_flight_compose_file_runs_every_agent_of_the_swarm_on_the_cluster() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.flight.yml").read_text())
    cluster = yaml.safe_load((DEPLOY / compose["include"][0]).read_text())["services"]
    swarm = tomllib.loads((DEPLOY / "flight-swarm.toml").read_text())["agents"]
    services = compose["services"]
    assert set(services) == set(swarm)
    for name, spec in swarm.items():
        service = services[name]
        assert service["command"] == [spec.get("agent", name)]
        assert service.get("deploy", {}).get("replicas", 1) == spec.get("replicas", 1)
        assert (service["restart"] == "no") == (spec.get("restart", True) is False)
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        urls = service["environment"]["BUSAGENTS_NATS_URL"].split(",")
        assert {u.removeprefix("nats://").split(":")[0] for u in urls} == set(cluster) == set(service["depends_on"])
