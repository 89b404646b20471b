"""The exceptions busagents raises; each message says what was wrong and what to do."""

from __future__ import annotations

import nats.errors

__all__ = [
    "BusagentsError",
    "ConfigError",
    "ConnectionLostError",
    "ContractError",
    "DecodeError",
    "InvalidSubjectError",
    "MessageTooLargeError",
    "NatsUnavailableError",
    "NoResponderError",
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


class NoResponderError(QueryFailedError):
    """Nobody subscribes to the query's subject: NATS said so at once (no wait for a timeout)."""


class NatsUnavailableError(BusagentsError):
    """No NATS server could be reached at the configured URL."""


class ConfigError(BusagentsError):
    """Configuration is missing or inconsistent."""


class PermanentError(BusagentsError):
    """Raised by a handler when retrying cannot help: a durable message is dead-lettered at once.

    Any other exception from a handler of a durable subscription is treated as transient:
    the message is redelivered with backoff until its contract's ``max_deliver``.
    """


class ConnectionLostError(NatsUnavailableError):
    """The NATS connection was closed for good while the agent ran (nats-py does not reconnect after a
    server's ``-ERR``); ``busagents run`` exits with it so that a supervisor starts the agent again."""


class MessageTooLargeError(PermanentError, nats.errors.MaxPayloadError):
    """A message to publish would break a server limit: larger than ``max_payload`` (headers included),
    or a subject too long for the server's control line. Refused before it is sent, since the server
    would close the connection.

    Permanent: a durable input whose output is too large is dead-lettered at once. Also a nats-py
    ``MaxPayloadError``, so code that catches nats-py's publish errors catches this one too.
    """

    def __str__(self) -> str:
        return Exception.__str__(self)  # not nats-py's fixed text


class InvalidSubjectError(PermanentError, nats.errors.BadSubjectError):
    """A subject to publish to is not a valid NATS subject (empty, with whitespace, or not UTF-8).

    Permanent, and also a nats-py ``BadSubjectError`` (see :class:`MessageTooLargeError`).
    """

    def __str__(self) -> str:
        return Exception.__str__(self)
