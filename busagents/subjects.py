"""The subject namespace busagents reserves: stats heartbeats, dead letters, agent inboxes.

Every module builds these subjects from here, so that a contract cannot take one of them
(:func:`is_reserved`) and the permissions a swarm derives match what its workers use.
"""

from __future__ import annotations

__all__ = [
    "DLQ_PREFIX",
    "DLQ_SUBJECTS",
    "RESERVED",
    "STATS_PREFIX",
    "dead_letter_subject",
    "inbox_prefix",
    "is_inbox",
    "is_reserved",
    "stats_subject",
]

#: Stats heartbeats: ``busagents.stats.<agent>``.
STATS_PREFIX = "busagents.stats"
#: Dead letters: ``busagents.dlq.<agent>``.
DLQ_PREFIX = "busagents.dlq"
#: Every dead letter, as the dead-letter stream keeps them.
DLQ_SUBJECTS = f"{DLQ_PREFIX}.>"
#: Prefixes a contract may not use: a message there would be read as a dead letter or stats.
RESERVED = (DLQ_PREFIX, STATS_PREFIX)
_INBOX = "_INBOX"


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
