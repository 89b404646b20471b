"""The exceptions busagents raises; each message says what was wrong and what to do."""

from __future__ import annotations

__all__ = [
    "BusagentsError",
    "ConfigError",
    "ContractError",
    "DecodeError",
    "NatsUnavailableError",
    "PermanentError",
    "QueryFailedError",
    "UndeclaredContractError",
]


class BusagentsError(Exception):
    """Base class of every busagents error."""


class ContractError(BusagentsError):
    """A contract class is declared wrongly, or a class that is not a contract was used as one."""


class DecodeError(BusagentsError):
    """Bytes on the wire do not match the contract they claim to be."""


class UndeclaredContractError(BusagentsError):
    """An agent tried to publish or request a contract it did not declare."""


class QueryFailedError(BusagentsError):
    """The agent answering a query failed, or nobody answered in time."""


class NatsUnavailableError(BusagentsError):
    """No NATS server could be reached at the configured URL."""


class ConfigError(BusagentsError):
    """Configuration is missing or inconsistent."""


class PermanentError(BusagentsError):
    """Raised by a handler when retrying cannot help: a durable message is dead-lettered at once.

    Any other exception from a handler of a durable subscription is treated as transient:
    the message is redelivered with backoff until its contract's ``max_deliver``.
    """
