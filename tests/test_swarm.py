"""Swarms: supervised replica processes, the static graph, AsyncAPI and permissions."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result

from busagents import Agent, Bus, ConfigError, Context, command, event, on, query
from busagents.micro import service_subjects
from busagents.process import pid_alive, set_scheduling
from busagents.server import NatsServer
from busagents.swarm import Graph, Supervisor, SwarmConfig, load_swarm
from busagents.swarm.supervisor import Replica

from .drain_agent import child_env, run_until_serving


@event("test.graph.seen", key="item")
class Seen(msgspec.Struct):
    item: str


@command("test.graph.act")
class Act(msgspec.Struct):
    item: str


@event("test.graph.done")
class Finished(msgspec.Struct):
    item: str


class Price(msgspec.Struct):
    cents: int


@query("test.graph.price", reply=Price)
class PriceOf(msgspec.Struct):
    item: str


class Watcher(Agent):
    produces = (Act, PriceOf)

    @on(Seen)
    async def seen(self, msg: Seen, ctx: Context) -> Act:
        return Act(item=msg.item)


class Actor(Agent):
    produces = (Finished,)

    @on(Act)
    async def act(self, msg: Act, ctx: Context) -> Finished:
        return Finished(item=msg.item)


class Pricer(Agent):
    @on(PriceOf)
    async def price(self, q: PriceOf, ctx: Context) -> Price:
        return Price(cents=100)


@command("test.graph.store", durable=True)
class Store(msgspec.Struct):
    item: str


class Storer(Agent):
    @on(Store)
    async def store(self, msg: Store, ctx: Context) -> None:
        pass


class OtherStorer(Agent):
    @on(Store)
    async def store(self, msg: Store, ctx: Context) -> None:
        pass


class StoreViewer(Agent):
    produces = (Store,)

    @on(Store, view=True)
    async def stored(self, msg: Store, ctx: Context) -> None:
        pass


def test_a_command_has_one_handling_agent_type_and_views_of_its_stream_do_not_count() -> None:
    problems = [str(p) for p in Graph([Storer, OtherStorer, StoreViewer]).check()]
    assert problems == ["error: command Store is consumed by several agent types: ['storer', 'other_storer']"]
    assert Graph([Storer, StoreViewer]).check() == []  # the viewer produces it and reads its stream


def test_graph_check_finds_missing_producers_and_handlers() -> None:
    problems = [str(p) for p in Graph([Watcher]).check()]
    assert "warning: Seen is consumed by ['watcher'] but no agent produces it" in problems
    assert "error: command Act is sent by ['watcher'] but nobody handles it" in problems
    assert "error: query PriceOf is sent by ['watcher'] but nobody answers" in problems
    assert [str(p) for p in Graph([Watcher, Actor, Pricer]).check(external=["Seen"])] == []


def test_asyncapi_document_describes_channels_messages_and_operations() -> None:
    doc = Graph([Watcher, Actor, Pricer]).asyncapi(title="t")
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["Seen"]["address"] == "test.graph.seen.{item}"
    assert "item" in doc["channels"]["Seen"]["parameters"]
    assert doc["operations"]["actor.receive.Act"]["bindings"]["nats"]["queue"] == "actor"
    assert doc["operations"]["watcher.send.Act"]["action"] == "send"
    assert "reply" in doc["operations"]["pricer.receive.PriceOf"]
    schemas = doc["components"]["schemas"]
    assert schemas["Seen"]["properties"]["item"]["type"] == "string"
    assert doc["components"]["messages"]["Price"]["payload"] == {"$ref": "#/components/schemas/Price"}


def test_two_contracts_on_one_subject_are_an_error() -> None:
    @event("test.graph.seen", key="item")
    class SeenToo(msgspec.Struct):
        item: str

    class Echo(Agent):
        produces = (SeenToo,)

    problems = Graph([Watcher, Echo]).check()
    assert any(
        p.severity == "error" and "share the subject test.graph.seen" in p.message and "SeenToo" in p.message
        for p in problems
    ), problems


def test_permissions_are_least_privilege() -> None:
    perms = Graph([Watcher, Actor, Pricer]).permissions()
    # inbox: the DLQ stream set-up; $SRV: the services protocol every instance answers (busagents ps)
    assert perms["actor"]["subscribe"] == sorted(["_INBOX.actor.>", "test.graph.act", *service_subjects("actor")])
    assert "test.graph.done" in perms["actor"]["publish"]
    assert "test.graph.act" not in perms["watcher"]["subscribe"]
    assert "_INBOX.watcher.>" in perms["watcher"]["subscribe"]  # replies to its queries, on its own inbox
    assert not any(s.startswith("_INBOX") for s in perms["pricer"]["publish"])  # it answers with...
    assert perms["pricer"]["allow_responses"] is True  # ...a reply to each request it received only
    assert perms["watcher"]["allow_responses"] is True  # it answers $SRV.PING, INFO and STATS
    assert not any(s.startswith("_INBOX") for s in perms["watcher"]["publish"])


def test_swarm_file_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "swarm.toml"
    bad.write_text("[agents.a]\nreplicas = 0\n")
    with pytest.raises(ConfigError, match=r"agents\.a\.replicas"):
        load_swarm(bad)
    bad.write_text("[agents\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_swarm(bad)
    bad.write_text("[agents.rebookr]\n")
    from busagents.cli.swarm import _graph

    with pytest.raises(ConfigError, match=r"swarm\.toml: agents\.rebookr: no agent plugin named 'rebookr'"):
        _graph(bad)


class Ledger(Agent):
    """Keeps a running total in memory: a second instance would keep a second, different total."""

    singleton = True


LEDGER = f"{__name__}:Ledger"


def swarm_cli(*args: str) -> Result:
    from busagents.cli import cli

    return CliRunner().invoke(cli, ["swarm", *args])


def test_swarm_check_names_a_singleton_agent_given_replicas(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(f'[agents.ledger]\nagent = "{LEDGER}"\nreplicas = 2\n')
    result = swarm_cli("check", str(swarm))
    assert result.exit_code == 1, result.output
    assert (
        f"error: ledger ({LEDGER}) declares singleton = True (it must run as one instance) "
        "but the swarm gives it replicas = 2; set replicas = 1"
    ) in result.output
    assert "the swarm has errors" in str(result.exception)

    swarm.write_text(f'[agents.ledger]\nagent = "{LEDGER}"\nreplicas = 1\n')
    result = swarm_cli("check", str(swarm))
    assert result.exit_code == 0, result.output
    assert result.output == "ok (0 warning(s))\n"


def test_swarm_up_refuses_a_singleton_agent_given_replicas_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from busagents.cli import swarm as swarm_module

    def must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("swarm up started NATS or replicas")

    monkeypatch.setattr(swarm_module, "nats_url", must_not_start)
    monkeypatch.setattr(swarm_module, "Supervisor", must_not_start)
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(f'[agents.ledger]\nagent = "{LEDGER}"\nreplicas = 2\n[agents.actor]\nagent = "{__name__}:Actor"\n')
    result = swarm_cli("up", str(swarm))
    assert result.exit_code == 1
    assert isinstance(result.exception, ConfigError), result.exception
    assert str(result.exception) == (
        f"{swarm}: ledger ({LEDGER}) declares singleton = True (it must run as one instance) "
        "but the swarm gives it replicas = 2; set replicas = 1"
    )


def test_a_singleton_agent_in_two_swarm_entries_is_an_error_too(tmp_path: Path) -> None:
    from busagents.cli.swarm import _load

    swarm = tmp_path / "swarm.toml"
    swarm.write_text(f'[agents.a]\nagent = "{LEDGER}"\n[agents.b]\nagent = "{LEDGER}"\n')
    config, agents = _load(swarm)
    assert [str(p) for p in config.check(agents) if p.severity == "error"] == [
        "error: agents ['a', 'b'] all run Ledger, which declares singleton = True (it must run as one instance), "
        "as 2 instances; keep one of them, with replicas = 1"
    ]
    swarm.write_text(f'[agents.a]\nagent = "{LEDGER}"\n[agents.b]\nagent = "{__name__}:Actor"\nreplicas = 3\n')
    config, agents = _load(swarm)
    assert [p for p in config.check(agents) if p.severity == "error"] == []  # keys that are not names only warn


async def test_swarm_up_restarts_a_killed_replica_and_drains_on_sigterm(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\nreplicas = 2\n')
    env = child_env()
    stats = await bus.nc.subscribe("busagents.stats.slow")
    await bus.flush()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "busagents", "swarm", "up", str(swarm), "--nats", nats_server.url),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )

    pids: list[int] = []

    async def instances_until(count: int) -> list[int]:
        while len(pids) < count:
            beat = await stats.next_msg(timeout=20)
            pid = int(msgspec.json.decode(beat.data)["instance"].rsplit(":", 1)[1])
            if pid not in pids:
                pids.append(pid)
        return list(pids)

    try:
        first_two = await instances_until(2)
        os.kill(first_two[0], signal.SIGKILL)
        all_three = await instances_until(3)  # a new pid: the killed replica was restarted
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await stats.unsubscribe()
    text = err.decode()
    assert set(first_two) < set(all_three)
    assert "slow[0] exited with -9; restarting" in text or "slow[1] exited with -9; restarting" in text
    assert proc.returncode == 0, text
    assert text.count("stopped (exit 0)") == 2


async def test_swarm_up_passes_its_log_level_to_replicas_unless_an_agent_env_overrides_it(
    tmp_path: Path, nats_server: NatsServer, bus: Bus
) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(
        '[agents.loud]\nagent = "drain_agent:Slow"\n'
        '[agents.quiet]\nagent = "drain_agent:Slow"\nenv = { BUSAGENTS_LOG_LEVEL = "WARNING" }\n'
    )
    args = ("--log-level", "INFO", "swarm", "up", str(swarm), "--nats", nats_server.url)
    code, text = await run_until_serving(bus, *args, replicas=2)  # both agents' replicas started
    assert code == 0, text
    assert text.count("INFO busagents.worker: worker started: slow") == 1, text  # loud's, not quiet's
    assert text.count("INFO busagents.worker: worker drained") == 1, text


@pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's (elsewhere nothing changes: tested below)"
)
async def test_swarm_up_runs_replicas_as_sched_batch_unless_interactive_or_set_to_normal(
    nats_server: NatsServer, bus: Bus
) -> None:
    env = {"PYTHONPATH": child_env()["PYTHONPATH"], "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2"}
    config = SwarmConfig.model_validate(
        {
            "agents": {
                "slow": {"agent": "drain_agent:Slow", "env": env},  # scheduling: auto, not interactive
                "waiter": {"agent": "drain_agent:Waiter", "env": env},  # auto, interactive
                "normal": {"agent": "drain_agent:Slow", "env": env, "scheduling": "normal"},
                "batch": {"agent": "drain_agent:Waiter", "env": env, "scheduling": "batch"},
            }
        }
    )
    beats = await bus.nc.subscribe("busagents.stats.*")
    await bus.flush()
    supervisor = Supervisor(config, nats_server.url, on_event=Said(), stop_timeout=20)
    stop = asyncio.Event()
    running = asyncio.create_task(supervisor.run(stop))
    policies: dict[str, int] = {}
    try:
        serving: set[int] = set()  # a replica sets its policy before it connects: serving, it has it
        while len(serving) < 4:
            beat = await beats.next_msg(timeout=20)
            serving.add(int(msgspec.json.decode(beat.data)["instance"].rsplit(":", 1)[1]))
        for replica in supervisor.replicas:
            assert replica.process is not None and replica.process.pid in serving
            policies[replica.key] = os.sched_getscheduler(replica.process.pid)
        stop.set()
        await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        await beats.unsubscribe()
        for replica in supervisor.replicas:
            if replica.process is not None and replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()
    assert policies == {
        "slow": os.SCHED_BATCH,
        "waiter": os.SCHED_OTHER,
        "normal": os.SCHED_OTHER,
        "batch": os.SCHED_BATCH,
    }


def test_a_scheduling_the_os_has_no_name_for_is_refused(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text('[agents.slow]\nagent = "drain_agent:Slow"\nscheduling = "fast"\n')
    with pytest.raises(ConfigError, match="scheduling"):
        load_swarm(swarm)
    with pytest.raises(ValueError, match="scheduling must be one of normal, batch, not 'fast'"):
        NatsServer(scheduling="fast")


@pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's (elsewhere nothing changes: tested below)"
)
async def test_an_embedded_server_can_run_as_sched_batch() -> None:
    async with NatsServer(scheduling="batch") as batch, NatsServer(scheduling="normal") as normal:
        assert batch.process is not None and normal.process is not None
        assert os.sched_getscheduler(batch.process.pid) == os.SCHED_BATCH
        assert os.sched_getscheduler(normal.process.pid) == os.SCHED_OTHER
    # a server asked for the normal policy by a process running as batch gets the normal one
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        async with NatsServer(scheduling="normal") as normal, NatsServer() as inherited:
            assert normal.process is not None and inherited.process is not None
            assert os.sched_getscheduler(normal.process.pid) == os.SCHED_OTHER
            assert os.sched_getscheduler(inherited.process.pid) == os.SCHED_BATCH
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def test_where_the_os_has_no_batch_policy_asking_for_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    before = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
    monkeypatch.delattr(os, "SCHED_BATCH", raising=False)  # as on macOS or Windows
    assert set_scheduling("batch") is False
    if before is not None:
        assert os.sched_getscheduler(0) == before
    with pytest.raises(ValueError, match="scheduling must be one of normal, batch, not 'idle'"):
        set_scheduling("idle")


def slow_swarm(replicas: int) -> SwarmConfig:
    env = child_env()
    return SwarmConfig.model_validate(
        {
            "agents": {
                "slow": {
                    "agent": "drain_agent:Slow",
                    "replicas": replicas,
                    "env": {"PYTHONPATH": env["PYTHONPATH"], "BUSAGENTS_HEARTBEAT_INTERVAL": "0.2"},
                }
            }
        }
    )


class Said:
    """The supervisor's events, kept and awaitable."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._queue: asyncio.Queue[str] = asyncio.Queue()

    def __call__(self, text: str) -> None:
        self.lines.append(text)
        self._queue.put_nowait(text)

    async def next(self, prefix: str, timeout: float = 20.0) -> str:
        """The next event that starts with ``prefix``."""

        async def find() -> str:
            while not (line := await self._queue.get()).startswith(prefix):
                pass
            return line

        return await asyncio.wait_for(find(), timeout)

    def matching(self, prefix: str) -> list[str]:
        return [line for line in self.lines if line.startswith(prefix)]


def pid_of(started: str) -> int:
    return int(started.rsplit(" ", 1)[1])


async def test_cancelling_the_supervisor_leaves_no_watcher_and_no_replica(nats_server: NatsServer) -> None:
    said = Said()
    supervisor = Supervisor(slow_swarm(2), nats_server.url, on_event=said, stop_timeout=20)
    running = asyncio.create_task(supervisor.run(asyncio.Event()))
    try:
        pids = [pid_of(await said.next("started slow[")) for _ in range(2)]
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        watchers = [t for t in asyncio.all_tasks() if t.get_name().startswith("watch:") and not t.done()]
        alive = [pid for pid in pids if pid_alive(pid)]
    finally:
        for replica in supervisor.replicas:  # whatever the code under test left behind
            if replica.process is not None and replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()
    assert watchers == []
    assert alive == []


async def test_a_replica_restarting_when_stop_arrives_gets_sigterm_at_once(nats_server: NatsServer) -> None:
    stop, stopping = asyncio.Event(), asyncio.Event()
    said = Said()

    def on_event(text: str) -> None:
        said(text)
        if text.startswith("stopping"):
            stopping.set()

    class StopWhileRestarting(Supervisor):
        async def _spawn(self, replica: Replica) -> None:
            if replica.restarts:  # stop arrives while the restarted process is being created
                stop.set()
                await asyncio.wait_for(stopping.wait(), 5)  # the supervisor signalled the replicas it knew of
            await super()._spawn(replica)

    supervisor = StopWhileRestarting(slow_swarm(1), nats_server.url, on_event=on_event, stop_timeout=5)
    running = asyncio.create_task(supervisor.run(stop))
    try:
        os.kill(pid_of(await said.next("started slow[0]")), signal.SIGKILL)
        await asyncio.wait_for(running, 20)
    finally:
        running.cancel()
        for replica in supervisor.replicas:
            if replica.process is not None and replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()
    assert len(said.matching("started slow[0]")) == 2, said.lines  # the restart happened
    assert not said.matching("slow[0] did not drain"), said.lines  # it was not left to the stop timeout
    assert said.matching("slow[0] stopped (exit "), said.lines


def test_mermaid_names_every_edge_with_safe_node_ids() -> None:
    text = Graph([Watcher, Actor, Pricer]).mermaid()
    assert text.splitlines()[0] == "flowchart LR"
    assert 'watcher["watcher"] -->|Act| actor["actor"]' in text
    assert 'watcher["watcher"] -->|PriceOf| pricer["pricer"]' in text
    assert 'actor["actor"] -->|Finished| outside((outside))' in text
