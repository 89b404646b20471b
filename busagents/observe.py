"""Reading the bus from outside: one message as ``busagents watch`` and ``busagents trace`` show it.

A message is decoded with its contract, found by its ``Ba-Contract`` header (or, for a
plain client's message, by its subject) among the contracts the installed agent plugins
declare (:func:`busagents.plugins.available_contracts`). A contract nobody installed
declares, or a body that does not decode, is shown raw. Dead letters (``busagents.dlq.*``)
carry the original's envelope, and their agent, stage and reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from .codec import codec_for
from .contract import ContractInfo, contract_info
from .dlq import DLQ_AGENT, DLQ_MSG_ID, DLQ_REASON, DLQ_STAGE, DLQ_SUBJECT
from .envelope import CAUSATION_ID, CONTRACT, CONVERSATION_ID, LLM, MSG_ID, SENDER, SENT_AT, VERSION
from .errors import DecodeError
from .subjects import DLQ_PREFIX, STATS_PREFIX, is_inbox

__all__ = ["Catalog", "Seen", "is_internal"]

#: Subjects of the machinery rather than of a conversation: not shown unless asked for.
_INTERNAL = ("$JS.", "$SRV.", "$KV.", "$O.", "$SYS.", f"{STATS_PREFIX}.")


def is_internal(subject: str) -> bool:
    """JetStream API and acks, services protocol, inboxes (replies), KV, heartbeats."""
    return subject.startswith(_INTERNAL) or is_inbox(subject)


@dataclass(slots=True)
class Seen:
    """One message, decoded as far as its contract is known."""

    subject: str
    time: float | None  # the sender's Ba-Sent-At (seconds), else when it was read
    id: str | None
    contract: str | None
    version: int | None
    conversation: str | None
    causation: str | None
    sender: str | None
    body: Any  # the decoded contract as builtins; else the JSON; else the text
    known: bool  # decoded with an installed contract
    dead_letter: dict[str, str] | None = None  # agent, stage, reason, subject, original id
    llm: str | None = None  # the model calls that decided it (Ba-Llm)
    stream: str | None = None
    seq: int | None = None

    def line(self, width: int = 120) -> str:
        """The body on one line, cut to ``width`` characters."""
        text = self.body if isinstance(self.body, str) else json.dumps(self.body, ensure_ascii=False, default=str)
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    """The contracts a reader can decode: those the installed plugins declare, and any given."""

    def __init__(self, contracts: Iterable[type[Any]]) -> None:
        self.by_name: dict[str, ContractInfo] = {}
        self._subjects: list[tuple[re.Pattern[str], ContractInfo]] = []
        for cls in contracts:
            info = contract_info(cls)
            self.by_name.setdefault(info.name, info)
            self._subjects.append((_pattern(info.subscribe_subject), info))

    @classmethod
    def installed(cls) -> Catalog:
        from .plugins import available_contracts  # plugins import agents; not needed to build a catalog

        contracts, _ = available_contracts()
        return cls(contracts)

    def for_subject(self, subject: str) -> ContractInfo | None:
        for pattern, info in self._subjects:
            if pattern.fullmatch(subject):
                return info
        return None

    def read(
        self,
        subject: str,
        headers: dict[str, str] | None,
        data: bytes,
        *,
        received: float,
        stream: str | None = None,
        seq: int | None = None,
    ) -> Seen:
        """What one message says: envelope, contract and body (raw when the contract is unknown)."""
        headers = headers or {}
        get = headers.get
        dead: dict[str, str] | None = None
        if subject.startswith(DLQ_PREFIX + ".") and DLQ_REASON in headers:
            dead = {
                "agent": get(DLQ_AGENT, ""),
                "stage": get(DLQ_STAGE, ""),
                "reason": get(DLQ_REASON, ""),
                "subject": get(DLQ_SUBJECT, ""),
                "original_id": get(DLQ_MSG_ID, ""),
            }
        name = get(CONTRACT)
        info = self.by_name.get(name) if name else self.for_subject(get(DLQ_SUBJECT, subject) if dead else subject)
        body, known = _decode(info, data)
        sent = _int(get(SENT_AT))
        return Seen(
            subject=subject,
            time=sent / 1e9 if sent else received,
            id=(get(DLQ_MSG_ID) if dead else get(MSG_ID)) or None,
            contract=name or (info.name if info else None),
            version=_int(get(VERSION)),
            conversation=get(CONVERSATION_ID),
            causation=get(CAUSATION_ID),
            sender=get(SENDER),
            body=body,
            known=known,
            dead_letter=dead,
            llm=get(LLM),
            stream=stream,
            seq=seq,
        )


def _decode(info: ContractInfo | None, data: bytes) -> tuple[Any, bool]:
    if info is not None:
        try:
            decoded = codec_for(info.cls).decode(data)
            if not info.is_struct:  # a pydantic contract
                return decoded.model_dump(mode="json"), True
            return msgspec.to_builtins(decoded), True
        except (DecodeError, TypeError, ValueError):
            pass
    try:
        return json.loads(data), False
    except ValueError:
        return data.decode("utf-8", "replace"), False


def _pattern(subject: str) -> re.Pattern[str]:
    parts = ["[^.]+" if token == "*" else ".+" if token == ">" else re.escape(token) for token in subject.split(".")]
    return re.compile(r"\.".join(parts))


def _int(value: str | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 20:
        return None
    return int(value)
