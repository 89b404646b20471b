"""The subject namespace busagents reserves: stats heartbeats, dead letters, agent inboxes.

Every module builds these subjects from here, so that a contract cannot take one of them
(:func:`is_reserved`) and the permissions a swarm derives match what its workers use.
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = [
    "DLQ_PREFIX",
    "DLQ_SUBJECTS",
    "DRYRUN_PREFIX",
    "RESERVED",
    "STATS_PREFIX",
    "dead_letter_subject",
    "inbox_prefix",
    "is_inbox",
    "is_reserved",
    "namespace_prefix",
    "stats_subject",
    "stream_token",
]

#: Stats heartbeats: ``busagents.stats.<agent>``.
STATS_PREFIX = "busagents.stats"
#: Dead letters: ``busagents.dlq.<agent>``.
DLQ_PREFIX = "busagents.dlq"
#: Every dead letter, as the dead-letter stream keeps them.
DLQ_SUBJECTS = f"{DLQ_PREFIX}.>"
#: What agents in dry-run mode would have sent: ``busagents.dryrun.<agent>`` (:mod:`busagents.dryrun`).
DRYRUN_PREFIX = "busagents.dryrun"
#: Prefixes a contract may not use: a message there would be read as a dead letter, stats or a record.
RESERVED = (DLQ_PREFIX, STATS_PREFIX, DRYRUN_PREFIX)
_INBOX = "_INBOX"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def stats_subject(agent_name: str) -> str:
    """Where the workers of an agent type send their heartbeats."""
    return f"{STATS_PREFIX}.{agent_name}"


def dead_letter_subject(agent_name: str) -> str:
    """Where the workers of an agent type send what they could not handle."""
    return f"{DLQ_PREFIX}.{agent_name}"


def inbox_prefix(agent_name: str) -> str:
    """The inbox prefix of an agent's connection (``_INBOX.<agent>``): only it may read its replies."""
    return f"{_INBOX}.{agent_name}"


def is_inbox(subject: str) -> bool:
    """Whether ``subject`` is a reply inbox (``_INBOX.``...): answers go there, not conversations."""
    return subject.startswith(_INBOX + ".")


def is_reserved(subject: str) -> bool:
    """Whether ``subject`` is, or is under, a prefix busagents keeps for itself."""
    return any(subject == r or subject.startswith(r + ".") for r in RESERVED)


def namespace_prefix(prefix: str) -> str:
    """A subject namespace (``replay.c1`` or ``replay.c1.``) as prepended to subjects: ``replay.c1.``.

    Agents on a bus with a prefix subscribe, publish, store and keep state only under it, beside
    production: a replay or a trial run never touches production subjects.
    """
    if not prefix:
        return ""
    tokens = prefix.removesuffix(".").split(".")
    if not all(_TOKEN.fullmatch(t) for t in tokens) or is_reserved(prefix) or prefix.startswith(("$", _INBOX)):
        raise ConfigError(
            f"invalid subject prefix {prefix!r}: use dot-separated tokens of letters, digits, '_' or '-' "
            "(e.g. replay.c1), outside busagents' own and NATS' reserved subjects"
        )
    return ".".join(tokens) + "."


def stream_token(prefix: str) -> str:
    """What a namespace puts before stream and bucket names (which cannot hold dots): ``replay_c1_``."""
    return prefix.replace(".", "_")
