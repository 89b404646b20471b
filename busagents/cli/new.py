"""``busagents new NAME``: scaffold an agent plugin package with a passing test."""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from pathlib import Path

import click

from ..errors import ConfigError

_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "{dist}"
version = "0.1.0"
description = "A busagents agent plugin."
requires-python = ">=3.11"
dependencies = ["busagents"]

[project.optional-dependencies]
test = ["busagents[testing]"]

[project.entry-points."busagents.agents"]
{agent_name} = "{package}.agent:{cls}"

[tool.hatch.build.targets.wheel]
packages = ["{package}"]

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "session"
asyncio_default_test_loop_scope = "session"
"""

_CONTRACTS = '''\
"""The typed messages of {package}: what it consumes and what it produces."""

import msgspec

from busagents import event


@event("{prefix}.reading", key="sensor_id")
class Reading(msgspec.Struct):
    """A measurement arrived."""

    sensor_id: str
    value: float


@event("{prefix}.alert", key="sensor_id")
class Alert(msgspec.Struct):
    """A measurement crossed the threshold."""

    sensor_id: str
    value: float
    threshold: float
'''

_AGENT = '''\
"""{cls}: watches readings and raises an alert when one crosses the threshold."""

from busagents import Agent, Context, on

from .contracts import Alert, Reading


class {cls}(Agent):
    name = "{agent_name}"
    produces = (Alert,)
    threshold = 100.0

    @on(Reading)
    async def check(self, reading: Reading, ctx: Context) -> Alert | None:
        if reading.value <= self.threshold:
            return None
        ctx.log.info("alert for %s: %s", reading.sensor_id, reading.value)
        return Alert(sensor_id=reading.sensor_id, value=reading.value, threshold=self.threshold)
'''

_CONFTEST = 'pytest_plugins = ["busagents.testing"]\n'

_TEST = '''\
"""{cls} over a real nats-server (started by busagents.testing on a free port)."""

from busagents import Bus
from busagents.testing import run_agents

from {package}.agent import {cls}
from {package}.contracts import Alert, Reading


async def test_a_reading_over_the_threshold_raises_an_alert(bus: Bus) -> None:
    async with run_agents(bus, {cls}()):
        async with bus.expect(Alert, where=lambda a: a.sensor_id == "s1") as got:
            await bus.publish(Reading(sensor_id="s0", value=1.0))  # below: no alert
            await bus.publish(Reading(sensor_id="s1", value=120.0))
    assert got.message.body.value == 120.0
    assert got.message.envelope.sender == "{agent_name}"
'''

_README = """\
# {dist}

A busagents agent plugin.

```bash
pip install -e '.[test]'
pytest                      # runs the agent against a real nats-server on a free port
busagents agents list       # shows {agent_name}
busagents run {agent_name}  # runs it (embedded NATS when none is configured)
```
"""


@click.command("new")
@click.argument("name")
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None, help="Target directory."
)
def new_command(name: str, directory: Path | None) -> None:
    """Scaffold an agent plugin package NAME with a contract, an agent and a passing test."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\\-]*", name):
        raise ConfigError(f"invalid name {name!r}: use letters, digits, '-' or '_', starting with a letter")
    package = name.replace("-", "_").lower()
    if keyword.iskeyword(package):
        raise ConfigError(f"{name!r} is a Python keyword; choose another name")
    if package in sys.stdlib_module_names or _importable(package):
        raise ConfigError(
            f"{name!r} would be imported as {package!r}, which is already a module here; choose another name"
        )
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name)) + "Agent"
    target = directory or Path(name)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target} exists and is not empty; choose another --dir")
    values = {
        "dist": name,
        "package": package,
        "cls": cls,
        "agent_name": package.replace("_", "-"),
        "prefix": package,
    }
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{package}/__init__.py": '"""{dist}: a busagents agent plugin."""\n',
        f"{package}/contracts.py": _CONTRACTS,
        f"{package}/agent.py": _AGENT,
        "tests/conftest.py": _CONFTEST,
        "tests/test_agent.py": _TEST,
    }
    for rel, template in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**values))
    click.echo(f"created {target}/ with agent {values['agent_name']} ({package}.agent:{cls})")
    click.echo(f"next: cd {target} && pip install -e '.[test]' && pytest")


def _importable(package: str) -> bool:
    """True when ``import package`` already finds a module (a bare directory, a namespace, does not count)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None
