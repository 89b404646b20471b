"""Configuration from ``BUSAGENTS_*`` environment variables, with laptop-friendly defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "data_dir"]

DATA_DIR_ENV = "BUSAGENTS_DATA_DIR"


def data_dir(override: str | Path | None = None) -> Path:
    """Where busagents keeps data between runs (the development server's JetStream store and record):
    ``override``, else ``BUSAGENTS_DATA_DIR``, else the per-user data directory (platformdirs)."""
    chosen = override or os.environ.get(DATA_DIR_ENV) or platformdirs.user_data_dir("busagents", appauthor=False)
    return Path(chosen).expanduser().absolute()


class Settings(BaseSettings):
    """Runtime settings; every field can be set as ``BUSAGENTS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="BUSAGENTS_", extra="ignore")

    #: NATS URL. Unset: the busagents development server if one runs, else an embedded server.
    nats_url: str | None = None
    #: Data directory (see :func:`data_dir`); unset: the per-user data directory.
    data_dir: str | None = None
    #: Seconds a drain waits for in-flight handlers before giving up.
    drain_timeout: float = 30.0
    #: Seconds between stats heartbeats on ``busagents.stats.<agent>`` (0: off).
    heartbeat_interval: float = 5.0
    #: Logging level of the ``busagents`` CLI and the replicas it starts (``--log-level`` wins).
    log_level: str = "WARNING"
    #: Stream replicas for every durable contract (e.g. 3 on a 3-node cluster); unset: as declared.
    replicas: int | None = None
    #: Ack wait in seconds for every durable consumer; unset: as declared.
    ack_wait: float | None = None
    #: Deliveries of a durable message before it is dead-lettered; unset: as declared.
    max_deliver: int | None = None
    #: Subject namespace (``replay.c1``): every subject, stream and bucket of the agents goes under it.
    subject_prefix: str = ""
    #: Record what the agents send (``busagents.dryrun.<agent>``) instead of sending it.
    dry_run: bool = False
    #: Run the agent as ``<name>-shadow`` in dry-run mode (``busagents run --shadow``; swarm.toml ``shadow = true``).
    shadow: bool = False
    #: Keep core messages in the conversation log for ``busagents trace`` (:mod:`busagents.convlog`).
    conversation_log: bool = False
    #: Seconds the conversation log keeps a message.
    conversation_log_max_age: float = 3600.0
    #: Port of an agent process's ``/healthz`` and ``/metrics`` (:mod:`busagents.health`); unset: none.
    http_port: int | None = None
    #: Address those listen on (``0.0.0.0`` in a container, for probes and scrapers from outside).
    http_host: str = "127.0.0.1"
    #: Bytes the conversation log keeps at most (the oldest messages go first).
    conversation_log_max_bytes: int = 256 * 1024 * 1024
    #: Net allocations of container objects between two collections of Python's youngest generation
    #: in an agent process (``busagents run``, the flight demo); Python's default is 700, 0 leaves it.
    gc_threshold: int = Field(default=20_000, ge=0)
    #: CPU scheduling of an agent process (``busagents run``): ``normal``, ``batch`` (Linux ``SCHED_BATCH``:
    #: a woken process does not preempt the running one, so messages are read in batches), or ``auto``:
    #: batch unless the agent is ``interactive``; unset: as it was started. ``swarm up`` gives each replica
    #: swarm.toml's ``scheduling``.
    scheduling: Literal["normal", "batch", "auto"] | None = None
