"""Configuration from ``BUSAGENTS_*`` environment variables, with laptop-friendly defaults."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Runtime settings; every field can be set as ``BUSAGENTS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="BUSAGENTS_", extra="ignore")

    #: NATS URL. Unset: use nats://127.0.0.1:4222 if reachable, else start an embedded server.
    nats_url: str | None = None
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
    #: Keep core messages in the conversation log for ``busagents trace`` (:mod:`busagents.convlog`).
    conversation_log: bool = False
    #: Seconds the conversation log keeps a message.
    conversation_log_max_age: float = 3600.0
    #: Bytes the conversation log keeps at most (the oldest messages go first).
    conversation_log_max_bytes: int = 256 * 1024 * 1024
