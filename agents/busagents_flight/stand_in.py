"""A stand-in model for the LLM reasoner: answers like a model that follows the policy.

Used with :class:`busagents.llm.testing.MessagesServer` by tests and ``benchmarks/llm_storm.py``
(``python -m busagents.llm.testing busagents_flight.stand_in:answer --delay 2 --throttle 0.05``):
for a group case it picks, for each booking, the earliest option with room in the booked cabin
(else above, else below), counting the seats it gives within the request, else keeps a delayed
booking or refunds; for a single booking it does the same with the seats it was shown. Its
answers are valid unless the seats were taken meanwhile; then the reasoner's check refuses them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

from busagents.llm.testing import MessagesServer, RecordedRequest, Reply

__all__ = ["answer", "group_choices", "single_choice"]

_RANK = {"Y": 0, "W": 1, "J": 2, "F": 3}
_RESUBMIT = re.compile(r"resubmit choices for these \d+ booking\(s\) only: (.*)", re.S)


def _cabins(booked: str) -> list[str]:
    """The booked cabin, then above (nearest first), then below."""
    rank = _RANK[booked]
    return sorted(_RANK, key=lambda c: (_RANK[c] < rank, abs(_RANK[c] - rank)))


def group_choices(shared: dict[str, Any], bookings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One choice per booking of a group case."""
    used: Counter[tuple[str, str]] = Counter()
    return [_group_choice(shared, booking, used) for booking in bookings]


def _group_choice(shared: dict[str, Any], booking: dict[str, Any], used: Counter[tuple[str, str]]) -> dict[str, Any]:
    n = len(booking["passengers"])
    by = booking.get("rebook_only_if_arriving_by")
    for option in shared["searches"][booking["search"]]["options"]:
        if by is not None and option["arrives"] > by:
            continue
        for cabin in _cabins(booking["booked_cabin"]):
            room = [f["cabins"].get(cabin, {}).get("free", 0) - used[f["flight_id"], cabin] for f in option["flights"]]
            if all(r >= n for r in room):
                for f in option["flights"]:
                    used[f["flight_id"], cabin] += n
                return {
                    "booking_id": booking["booking_id"],
                    "action": "rebook",
                    "flights": [f["flight_id"] for f in option["flights"]],
                    "cabin": cabin,
                    "rationale": f"We moved you to {option['flights'][0]['number']}, the earliest arrival with room.",
                }
    if booking["why"] == "long_delay":
        return {"booking_id": booking["booking_id"], "action": "keep", "rationale": "Your flight is still the fastest."}
    return {"booking_id": booking["booking_id"], "action": "refund", "rationale": "No seats are left today."}


def single_choice(case: dict[str, Any]) -> dict[str, Any]:
    """The choice for a one-booking case (seats from those shown)."""
    n = len(case["passengers"])
    for option in case["options"]:
        for cabin in _cabins(case["booked_cabin"]):
            free = [f["free_seats"].get(cabin, []) for f in option["flights"]]
            if all(len(seats) >= n for seats in free):
                return {
                    "booking_id": case["booking_id"],
                    "action": "rebook",
                    "flights": [f["flight_id"] for f in option["flights"]],
                    "cabin": cabin,
                    "seats": [[s.split()[0] for s in seats[:n]] for seats in free],
                    "rationale": f"We moved you to {option['flights'][0]['number']}, the earliest arrival with room.",
                }
    if case["why"] == "long_delay":
        return {"booking_id": case["booking_id"], "action": "keep", "rationale": "Your flight is still the fastest."}
    return {"booking_id": case["booking_id"], "action": "refund", "rationale": "No seats are left today."}


def case_parts(request: RecordedRequest) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the shared part or None, the case) that the reasoner sent as read_case results."""
    results = [b for b in request.messages[2]["content"] if b.get("type") == "tool_result"]
    if len(results) == 2:
        return json.loads(results[0]["content"]), json.loads(results[1]["content"])
    return None, json.loads(results[0]["content"])


def refused(request: RecordedRequest) -> set[str] | None:
    """The booking ids the reasoner asked to resubmit in its last message (None: a first turn)."""
    if len(request.messages) <= 3:
        return None
    _, case = case_parts(request)
    listed = [b["booking_id"] for b in case.get("bookings", [])]
    for result in request.tool_results():
        found = _RESUBMIT.search(str(result.get("content", "")))
        if found:
            return {b for b in listed if f"{b}: " in found.group(1)}
    return set()


def answer(server: MessagesServer, request: RecordedRequest) -> Reply:
    """The stand-in's turn: a decide call with valid choices for what the request asks."""
    shared, case = case_parts(request)
    if shared is None:
        decision = single_choice(case)
    else:
        again = refused(request)
        bookings = [b for b in case["bookings"] if again is None or b["booking_id"] in again]
        decision = {"choices": group_choices(shared, bookings)}
    content = [{"type": "tool_use", "id": f"toolu_standin_{len(server.requests)}", "name": "decide", "input": decision}]
    return server.answer(request, content)
