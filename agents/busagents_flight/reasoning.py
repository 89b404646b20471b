"""The ``Reasoner`` interface: from a disruption and its gathered context to typed decisions.

The reasoner agent gathers the context over the bus (``BookingsOnFlight``,
``Alternatives``), builds a :class:`Case` and asks a :class:`Reasoner` for one
``RebookPassenger`` per affected booking. Backends register in the entry-point
group ``busagents_flight.reasoners`` (``offline`` is the deterministic default;
an LLM backend registers there too) and are chosen by name with
``--reasoner`` / ``BUSAGENTS_FLIGHT_REASONER``. The agent validates every
decision against the case before anything is published, so a backend cannot
assign a seat that is not free or forget a passenger.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable
from importlib.metadata import entry_points
from typing import ClassVar, Literal

import msgspec
from busagents_travel import AlternativeItinerary, Booking, Disruption, RebookPassenger

from busagents import ConfigError, Context

__all__ = [
    "REASONERS_GROUP",
    "AffectedBooking",
    "Case",
    "Lookup",
    "Reasoner",
    "available_reasoners",
    "load_reasoner",
    "search_key",
]

REASONERS_GROUP = "busagents_flight.reasoners"


class AffectedBooking(msgspec.Struct, kw_only=True):
    """One booking a disruption affects, and where its journey must continue from."""

    booking: Booking
    why: Literal["cancelled", "missed_connection", "long_delay"]
    replaces: list[str]  # flight ids of the legs a rebooking replaces (the disrupted one onwards)
    origin: str  # where the passengers will be when the replacement starts
    destination: str  # their final destination
    not_before: int  # earliest departure they can make (epoch seconds)
    current_arrival: int | None  # arrival at the destination if nothing changes (None: they cannot get there)
    stranded: bool = False  # mid-journey (at a connection point), not at home
    exclude: list[str] = []  # flights not to rebook onto (the disrupted and the missed ones)
    search: str = ""  # key of this booking's itineraries in Case.alternatives

    def with_search(self, disruption: Disruption) -> AffectedBooking:
        """Fill ``exclude`` and ``search`` for ``disruption``; returns self."""
        self.exclude = sorted({disruption.flight_id, *disruption.missed_connections, *self.replaces})
        self.search = search_key(self.origin, self.destination, self.not_before, self.exclude)
        return self


def search_key(origin: str, destination: str, not_before: int, exclude: list[str]) -> str:
    """The key of one itinerary search in ``Case.alternatives``."""
    return f"{origin}>{destination}@{not_before}-{','.join(exclude)}"


class Case(msgspec.Struct, kw_only=True):
    """Everything a reasoner needs to decide one disruption, gathered over the bus."""

    disruption: Disruption
    affected: list[AffectedBooking]
    alternatives: dict[str, list[AlternativeItinerary]]  # by AffectedBooking.search, earliest arrival first
    taken_seats: list[str] = []  # "<flight_id>/<seat>" known taken although the view may show them free
    attempt: int = 1


#: Fetches more itineraries: (origin, destination, not_before, exclude) -> itineraries.
Lookup = Callable[[str, str, int, list[str]], Awaitable[list[AlternativeItinerary]]]


class Reasoner(abc.ABC):
    """Decides how to re-accommodate the passengers of one disruption.

    ``decide`` returns one ``RebookPassenger`` per entry of ``case.affected`` (same
    ``booking_id``; ``action`` ``rebook``, ``refund`` or ``keep``). ``lookup`` asks the
    context agent for further itineraries, for backends that search on their own
    (tool use). Seats must come from ``case.alternatives`` (or ``lookup``) and not be
    in ``case.taken_seats``.
    """

    #: Backend name, recorded in each decision (``RebookPassenger.reasoner``).
    name: ClassVar[str] = ""

    #: Set by the reasoner agent that runs this backend: the seats on some flights given out by now.
    seats_given_out: Callable[[Iterable[str]], set[str]] | None = None

    def given_out(self, flights: Iterable[str]) -> set[str]:
        """The seats on ``flights`` given out by now ("<flight_id>/<seat>"), by any replica: more than
        ``case.taken_seats`` when the case was gathered a while ago. A backend that waits (a model) reads
        it before deciding from the seats it read earlier. The reasoner agent that runs this backend
        answers it (:attr:`seats_given_out`); on its own, nothing is known beyond the case."""
        return self.seats_given_out(flights) if self.seats_given_out is not None else set()

    @abc.abstractmethod
    async def decide(self, case: Case, lookup: Lookup) -> list[RebookPassenger]:
        """The decisions for ``case``."""

    async def decide_in(self, ctx: Context, case: Case, lookup: Lookup) -> list[RebookPassenger]:
        """``decide``, called from the reasoner agent's handler; backends that use the bus
        themselves (the LLM backend's tools, budgets per conversation) override this."""
        return await self.decide(case, lookup)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients or connections (called when the reasoner agent stops)."""


def available_reasoners() -> dict[str, str]:
    """Installed reasoner backends: name -> ``module:Class``."""
    return {ep.name: ep.value for ep in entry_points(group=REASONERS_GROUP)}


def load_reasoner(name: str) -> Reasoner:
    """An instance of the reasoner backend registered as ``name``."""
    found = {ep.name: ep for ep in entry_points(group=REASONERS_GROUP)}
    if name not in found:
        from .policy import OfflinePolicy  # always available, even from a source checkout

        if name == OfflinePolicy.name:
            return OfflinePolicy()
        known = ", ".join(sorted({*found, OfflinePolicy.name}))
        raise ConfigError(f"no reasoner named {name!r} (installed: {known}); see entry-point group {REASONERS_GROUP}")
    try:
        cls = found[name].load()
    except Exception as exc:
        raise ConfigError(f"reasoner {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Reasoner)):
        raise ConfigError(f"reasoner {name!r} is {cls!r}, not a Reasoner subclass")
    return cls()
