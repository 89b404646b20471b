"""Kubernetes manifests of a swarm (``busagents swarm k8s swarm.toml -o DIR``).

A kustomize base, one file per object::

    DIR/kustomization.yaml          lists every file below (``kubectl apply -k DIR``)
    DIR/<agent>.deployment.yaml     an agent's Deployment (<agent>.job.yaml: a Job for ``restart = false``)
    DIR/<agent>.scaledobject.yaml   a KEDA ScaledObject for an agent with durable handlers
    DIR/nats/values.yaml            values of the official NATS Helm chart (3-node JetStream cluster)

The NATS cluster is not in the kustomization (that would need helm inside ``kubectl kustomize``):
``helm install nats nats/nats -n NAMESPACE -f DIR/nats/values.yaml`` first. Its release name ``nats``
gives the services the agents (``nats``) and KEDA (``nats-headless``, monitoring port) talk to.

Each durable consumer an agent's replicas share (``<agent>``, or ``<agent>-p<i>`` per partition
of an ordered contract, on stream ``BA_<Contract>``) becomes one ``nats-jetstream`` trigger of
the agent's ScaledObject: KEDA adds replicas while that consumer's lag is over the threshold.
View handlers (an ordered consumer per replica) and core-NATS handlers have no shared lag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..agent import Agent
from ..durable import consumer_names, stream_name
from .config import AgentSpec, SwarmConfig

__all__ = ["K8sOptions", "durable_consumers", "k8s_manifests", "write_k8s"]

NATS_RELEASE = "nats"  # helm install <release>: the chart names its services after it
HTTP_PORT = 8080
MONITOR_PORT = 8222
NATS_VALUES: dict[str, Any] = {
    "config": {
        "cluster": {"enabled": True, "replicas": 3},
        "jetstream": {"enabled": True, "fileStore": {"enabled": True, "pvc": {"enabled": True, "size": "10Gi"}}},
        "monitor": {"enabled": True, "port": MONITOR_PORT},  # KEDA's nats-jetstream scaler reads /jsz
    },
}


@dataclass(frozen=True)  # no slots: the CLI reads the defaults off the class
class K8sOptions:
    image: str = "busagents:latest"
    namespace: str = "busagents"
    lag_threshold: int = 1000  # pending messages per replica before KEDA adds one (without autoscale)
    max_factor: int = 4  # without autoscale: maxReplicaCount = replicas * max_factor (at most 64)
    cpu: str = "100m"
    memory: str = "256Mi"
    memory_limit: str = "512Mi"


def durable_consumers(agent: type[Agent]) -> list[tuple[str, str]]:
    """(stream, consumer) of every durable consumer the agent's replicas share, as the worker names them."""
    pairs: list[tuple[str, str]] = []
    for handler in agent.handlers.values():
        if handler.durable and handler.durability is not None:
            stream = stream_name(handler.contract, handler.durability)
            pairs += [(stream, name) for name in consumer_names(agent.name, handler.durability)]
    return list(dict.fromkeys(pairs))


def k8s_manifests(
    config: SwarmConfig, agents: Mapping[str, type[Agent]], options: K8sOptions | None = None
) -> dict[str, Any]:
    """Relative path -> the object (or values document) to write there, kustomization.yaml included."""
    opts = options or K8sOptions()
    files: dict[str, Any] = {}
    for key, cls in agents.items():
        spec = config.agents[key]
        name = _dns_name(key)
        workload = _workload(name, key, spec, config, opts)
        files[f"{name}.{workload['kind'].lower()}.yaml"] = workload
        consumers = durable_consumers(cls)
        if consumers and spec.restart and not cls.singleton and not spec.shadow:
            files[f"{name}.scaledobject.yaml"] = _scaled_object(name, spec, consumers, opts)
    resources = sorted(files)
    files["nats/values.yaml"] = NATS_VALUES
    files["kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": opts.namespace,
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "busagents"}, "includeSelectors": False}],
        "resources": resources,
    }
    return files


def write_k8s(files: Mapping[str, Any], out: Path) -> list[Path]:
    """Write :func:`k8s_manifests`' files under ``out`` (created if missing); the paths written."""
    written = []
    for rel, obj in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        written.append(path)
    return written


def _dns_name(key: str) -> str:
    """A Kubernetes object name (DNS-1123 label) from a swarm key."""
    return re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")[:63] or "agent"


def _workload(name: str, key: str, spec: AgentSpec, config: SwarmConfig, opts: K8sOptions) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    pod: dict[str, Any] = {
        "metadata": {"labels": labels},
        "spec": {
            "securityContext": {"runAsNonRoot": True},
            "terminationGracePeriodSeconds": 45,  # the worker drains (BUSAGENTS_DRAIN_TIMEOUT 30 s) on SIGTERM
            "containers": [_container(key, spec, config, opts)],
        },
    }
    if not spec.restart:  # plays once (a feed): a Job, not restarted when it exits 0
        pod["spec"]["restartPolicy"] = "OnFailure"
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": labels},
            "spec": {"backoffLimit": config.max_restarts, "template": pod},
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": spec.initial_replicas, "selector": {"matchLabels": labels}, "template": pod},
    }


def _container(key: str, spec: AgentSpec, config: SwarmConfig, opts: K8sOptions) -> dict[str, Any]:
    env = {
        "BUSAGENTS_NATS_URL": f"nats://{NATS_RELEASE}.{opts.namespace}.svc.cluster.local:4222",
        "BUSAGENTS_HTTP_PORT": str(HTTP_PORT),
        "BUSAGENTS_HTTP_HOST": "0.0.0.0",
        "BUSAGENTS_REPLICAS": "3",  # streams replicated on the 3 NATS nodes
        **spec.env,
    }
    args = [spec.agent or key] + (["--shadow"] if spec.shadow else [])
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10}
    container: dict[str, Any] = {
        "name": "agent",
        "image": opts.image,
        "args": args,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "ports": [{"name": "http", "containerPort": HTTP_PORT}],
        "readinessProbe": {**probe, "initialDelaySeconds": 2, "failureThreshold": 3},
        # /healthz is 503 while NATS is disconnected: give a reconnect a minute before a restart
        "livenessProbe": {**probe, "initialDelaySeconds": 15, "failureThreshold": 6},
        "resources": {
            "requests": {"cpu": opts.cpu, "memory": opts.memory},
            "limits": {"memory": opts.memory_limit},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False},
    }
    return container


def _scaled_object(name: str, spec: AgentSpec, consumers: list[tuple[str, str]], opts: K8sOptions) -> dict[str, Any]:
    # the swarm file's autoscale = { min, max, lag } when set, else from its replicas up to max_factor times
    auto = spec.autoscale
    low, high = (auto.min, auto.max) if auto else (spec.replicas, min(spec.replicas * opts.max_factor, 64))
    lag = auto.lag if auto else opts.lag_threshold
    monitoring = f"{NATS_RELEASE}-headless.{opts.namespace}.svc.cluster.local:{MONITOR_PORT}"
    triggers = [
        {
            "type": "nats-jetstream",
            "metadata": {
                "natsServerMonitoringEndpoint": monitoring,
                "account": "$G",  # the global account of a nats-server without accounts
                "stream": stream,
                "consumer": consumer,
                "lagThreshold": str(lag),
            },
        }
        for stream, consumer in consumers
    ]
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": low,
            "maxReplicaCount": max(high, low),
            "triggers": triggers,
        },
    }
