"""The offline rebooking policy: deterministic, explainable, no network.

For each affected booking, higher loyalty tiers first:

* earliest arrival at the final destination wins;
* the booked cabin is kept (an upgrade on the same itinerary is fine, a downgrade
  only when no itinerary has room in the booked cabin or above, with half the fare
  refunded);
* a booking's passengers travel together, seated in one row when possible;
* window / aisle preferences are honoured where a seat allows;
* a seat is assigned only if it is free and not already given away in this case;
* after a long delay the passengers stay put unless an alternative arrives at least
  30 minutes earlier; after a cancellation or a missed connection with no
  alternative they are refunded (and given a hotel when stranded mid-journey);
* the airline caused the change, so change fees are waived (the fee that would
  apply is recorded).
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import ClassVar

from busagents_travel import AlternativeItinerary, Cost, Flight, Leg, Passenger, RebookPassenger, Seat
from busagents_travel.model import TIER_RANK

from .reasoning import AffectedBooking, Case, Lookup, Reasoner

__all__ = ["OfflinePolicy", "TakenSeats", "choose_seats"]

_CABIN_RANK = {"Y": 0, "W": 1, "J": 2, "F": 3}
_IMPROVEMENT = 30 * 60
_HOTEL_WAIT = 6 * 3600


class OfflinePolicy(Reasoner):
    """Earliest arrival, same cabin, groups together, preferences, tier order; never a taken seat."""

    name: ClassVar[str] = "offline"

    async def decide(self, case: Case, lookup: Lookup) -> list[RebookPassenger]:
        taken = TakenSeats(case.taken_seats)
        order = sorted(case.affected, key=_priority)
        return [self.decide_one(case, affected, taken) for affected in order]

    def decide_one(self, case: Case, affected: AffectedBooking, taken: set[str]) -> RebookPassenger:
        """The decision for one booking; the seats it assigns are added to ``taken``."""
        booking = affected.booking
        cabin, candidates = _candidates(case, affected)
        for i, (itinerary, c) in enumerate(candidates):
            legs = _seat(itinerary, c, booking.passengers, taken)
            if legs is not None:
                for leg in legs:
                    taken.update(f"{leg.flight_id}/{s}" for s in leg.seats)
                later = _fallbacks(affected, (itinerary, c), candidates[i + 1 :], _CABIN_RANK[cabin], taken)
                return self.rebook(case, affected, itinerary, legs, cabin, later)
        if affected.why == "long_delay":
            return self.keep(case, affected)
        return self.refund(case, affected)

    def fallbacks(
        self, case: Case, affected: AffectedBooking, chosen: AlternativeItinerary, cabin: str, taken: set[str]
    ) -> list[list[Leg]]:
        """The fallbacks of a rebooking on ``chosen`` in ``cabin`` decided elsewhere (a model's choice): the
        policy's choices on the same terms, in its order, other than ``chosen``'s flights (see
        :func:`_fallbacks`); ``taken`` holds the seats of the decision and of those decided before it."""
        booked, candidates = _candidates(case, affected)
        flights = [f.flight_id for f in chosen.flights]
        others = [(it, c) for it, c in candidates if [f.flight_id for f in it.flights] != flights]
        return _fallbacks(affected, (chosen, cabin), others, _CABIN_RANK[booked], taken)

    # Decisions

    def _base(self, case: Case, affected: AffectedBooking) -> dict[str, object]:
        d = case.disruption
        return {
            "decision_id": f"{d.disruption_id}/{affected.booking.booking_id}/{case.attempt}",
            "disruption": d,
            "booking_id": affected.booking.booking_id,
            "passenger_ids": [p.passenger_id for p in affected.booking.passengers],
            "expected_version": affected.booking.version,
            "attempt": case.attempt,
            "reasoner": self.name,
        }

    def rebook(
        self,
        case: Case,
        affected: AffectedBooking,
        itinerary: AlternativeItinerary,
        legs: list[Leg],
        cabin: str,
        fallbacks: list[list[Leg]] | None = None,
    ) -> RebookPassenger:
        """Rebook ``affected`` on ``itinerary`` with the seats in ``legs`` (booked in ``cabin``), fees waived."""
        booking = affected.booking
        n = len(booking.passengers)
        new_cabin = legs[0].cabin
        downgrade = _CABIN_RANK[new_cabin] < _CABIN_RANK[cabin]
        cost = Cost(
            change_fee=booking.fare.change_fee * n,
            refund=booking.fare.price * n // 2 if downgrade else 0,
            waived=True,
            currency=booking.fare.currency,
        )
        hotel = _needs_hotel(affected, itinerary)
        route = " + ".join(
            f"{f.number} {f.origin} {_hm(f.departure)} -> {f.destination} {_hm(f.arrival)}" for f in itinerary.flights
        )
        later = (
            f", arriving {_duration(itinerary.arrival - affected.current_arrival)} "
            f"{'earlier' if itinerary.arrival < affected.current_arrival else 'later'} than now expected"
            if affected.current_arrival is not None
            else ""
        )
        seating = _seating_note(booking.passengers, legs[0], itinerary.free_seats[0])
        cabin_note = (
            f"cabin {new_cabin} as booked"
            if new_cabin == cabin
            else (
                f"upgraded {cabin} -> {new_cabin}"
                if not downgrade
                else f"downgraded {cabin} -> {new_cabin}, half the fare refunded"
            )
        )
        fee = f"change fee {_money(cost.change_fee, cost.currency)} waived" if cost.change_fee else "no change fee"
        rationale = (
            f"{_what(case, affected)}; rebooked on {route}{later}; {seating}; {cabin_note}; {fee} (airline-caused)"
            + ("; hotel provided for the overnight wait" if hotel else "")
        )
        return RebookPassenger(
            **self._base(case, affected),  # type: ignore[arg-type]
            action="rebook",
            replaces=affected.replaces,
            new_legs=legs,
            fallbacks=fallbacks or [],
            cost=cost,
            hotel=hotel,
            rationale=rationale,
        )

    def keep(self, case: Case, affected: AffectedBooking) -> RebookPassenger:
        """Leave the booking as it is (a delay no alternative improves on)."""
        rationale = (
            f"{_what(case, affected)}; no alternative arrives at least 30 min earlier, so the booking stays as it is"
        )
        return RebookPassenger(**self._base(case, affected), action="keep", rationale=rationale)  # type: ignore[arg-type]

    def refund(self, case: Case, affected: AffectedBooking) -> RebookPassenger:
        """Refund the booking in full (no seat to its destination today)."""
        booking = affected.booking
        n = len(booking.passengers)
        cost = Cost(refund=booking.fare.price * n, waived=True, currency=booking.fare.currency)
        rationale = (
            f"{_what(case, affected)}; no seat on any flight to {affected.destination} today, "
            f"so the booking is refunded in full ({_money(cost.refund, cost.currency)})"
            + ("; hotel provided at the connection point" if affected.stranded else "")
        )
        return RebookPassenger(
            **self._base(case, affected),  # type: ignore[arg-type]
            action="refund",
            replaces=affected.replaces,
            cost=cost,
            hotel=affected.stranded,
            rationale=rationale,
        )


#: Other itineraries a rebook decision offers the rebooker, for when its cabin is full by then
#: (each in the first cabin the policy would take; the rebooker tries the higher ones itself).
_FALLBACKS = 3


def _candidates(case: Case, affected: AffectedBooking) -> tuple[str, list[tuple[AlternativeItinerary, str]]]:
    """The cabin ``affected`` is booked in, and every (itinerary, cabin) it may be rebooked on, in the
    policy's order of preference: earliest arrival in the booked cabin or above, then below (after a
    long delay, only itineraries that arrive at least 30 min earlier than now expected)."""
    booking = affected.booking
    cabin = next((leg.cabin for leg in booking.legs if leg.flight_id in affected.replaces), booking.fare.cabin)
    itineraries = case.alternatives.get(affected.search, [])
    if affected.why == "long_delay" and affected.current_arrival is not None:
        itineraries = [it for it in itineraries if it.arrival <= affected.current_arrival - _IMPROVEMENT]
    own = _CABIN_RANK[cabin]
    upward = sorted((c for c in _CABIN_RANK if _CABIN_RANK[c] >= own), key=lambda c: _CABIN_RANK[c])
    downward = sorted((c for c in _CABIN_RANK if _CABIN_RANK[c] < own), key=lambda c: -_CABIN_RANK[c])
    return cabin, [(it, c) for cabins in (upward, downward) for it in itineraries for c in cabins]


def _needs_hotel(affected: AffectedBooking, itinerary: AlternativeItinerary) -> bool:
    return affected.stranded and itinerary.flights[0].departure - affected.not_before >= _HOTEL_WAIT


def _fallbacks(
    affected: AffectedBooking,
    chosen: tuple[AlternativeItinerary, str],
    later: list[tuple[AlternativeItinerary, str]],
    own: int,
    taken: set[str],
) -> list[list[Leg]]:
    """The next choices in the policy's order that have room and keep the chosen one's terms (a hotel
    or not; the booked cabin or above, or a downgrade like it): what the rebooker may take when
    the chosen one is full by the time it books. Without a downgrade, one per itinerary and not
    the chosen one: the rebooker tries an itinerary's higher cabins itself."""
    hotel = _needs_hotel(affected, chosen[0])
    downgrade = _CABIN_RANK[chosen[1]] < own
    offered = {id(chosen[0])}  # the itineraries offered (each held by ``later`` meanwhile)
    out: list[list[Leg]] = []
    for itinerary, cabin in later:
        if len(out) == _FALLBACKS:
            break
        if not downgrade and id(itinerary) in offered:
            continue
        if (_CABIN_RANK[cabin] < own) != downgrade or _needs_hotel(affected, itinerary) != hotel:
            continue
        legs = _unseated(itinerary, cabin, len(affected.booking.passengers), taken)
        if legs is not None:
            out.append(legs)
            offered.add(id(itinerary))
    return out


def _unseated(itinerary: AlternativeItinerary, cabin: str, n: int, taken: set[str]) -> list[Leg] | None:
    """``itinerary``'s legs in ``cabin`` without seats, when every flight has room there for ``n`` passengers
    besides ``taken``; else None. A fallback is taken in a few decisions of thousands (when the chosen
    cabin filled up meanwhile): the store seats the group then, by :func:`choose_seats`, among the
    seats free at that moment, rather than the policy choosing seats for every decision's fallbacks."""
    legs: list[Leg] = []
    for flight, free in zip(itinerary.flights, itinerary.free_seats, strict=True):
        if not _prepared(flight.flight_id, free).room(cabin, n, taken):
            return None
        legs.append(_leg(flight, cabin, []))
    return legs


def _priority(affected: AffectedBooking) -> tuple[int, int, str]:
    tier = max(TIER_RANK[p.tier] for p in affected.booking.passengers)
    urgency = 1 if affected.why == "long_delay" else 0
    return (urgency, -tier, affected.booking.booking_id)


def _seat(
    itinerary: AlternativeItinerary, cabin: str, passengers: list[Passenger], taken: set[str]
) -> list[Leg] | None:
    legs: list[Leg] = []
    for flight, free in zip(itinerary.flights, itinerary.free_seats, strict=True):
        seats = _prepared(flight.flight_id, free).choose(cabin, passengers, taken)
        if seats is None:
            return None
        legs.append(_leg(flight, cabin, seats))
    return legs


def _leg(flight: Flight, cabin: str, seats: list[str]) -> Leg:
    return Leg(
        flight.flight_id,
        flight.number,
        flight.origin,
        flight.destination,
        flight.departure,
        flight.arrival,
        cabin,  # type: ignore[arg-type]
        seats,
    )


class _FreeSeats:
    """One flight's free seats of one reply, by cabin in row order: :func:`choose_seats`' choice, fast.

    A case tries the same few itineraries for every booking (and again for each fallback), so a
    reply's seats are split by cabin and ordered once, not once per booking; :meth:`choose`
    makes the choice :func:`choose_seats` makes among the seats not in ``taken``.
    """

    __slots__ = ("_positions", "by_cabin", "keyed", "prefix")

    def __init__(self, flight_id: str, free: list[Seat]) -> None:
        self.prefix = f"{flight_id}/"  # + a seat number: its key in ``taken``
        by_cabin: dict[str, list[Seat]] = defaultdict(list)
        for seat in free:
            by_cabin[seat.cabin].append(seat)
        for seats in by_cabin.values():
            # front to back, by letter within a row: seat maps come that way; anything else is sorted
            order = [(len(n), n) for n in map(_NUMBER, seats)]  # a number is a row and one letter
            if not all(map(operator.lt, order, order[1:])):
                seats.sort(key=lambda s: (_row(s), s.number[-1]))
        self.by_cabin = by_cabin
        #: cabin -> (key in ``taken``, seat), in the same order: a seat's key is made once, not per choice
        self.keyed = {cabin: [(self.prefix + s.number, s) for s in seats] for cabin, seats in by_cabin.items()}
        self._positions: dict[str, str] | None = None

    def _start(self, cabin: str, keyed: list[tuple[str, Seat]], taken: set[str]) -> int:
        """The index of the first seat of ``cabin`` not in ``taken``: with :class:`TakenSeats`, from where
        the last choice with that set found its taken seats end (see there)."""
        start = 0
        if type(taken) is not TakenSeats:
            marks = None
        else:
            marks = taken.marks.get(self)
            if marks is None:
                marks = taken.marks[self] = {}
            mark = marks.get(cabin)
            if mark is not None and len(taken) >= mark[0]:
                start = mark[1]
        end = len(keyed)
        while start < end and keyed[start][0] in taken:
            start += 1
        if marks is not None:
            marks[cabin] = (len(taken), start)
        return start

    def position(self, number: str) -> str | None:
        """The position (window, aisle, middle) of the free seat ``number``; None when it is not free."""
        if self._positions is None:
            self._positions = {s.number: s.position for seats in self.by_cabin.values() for s in seats}
        return self._positions.get(number)

    def room(self, cabin: str, n: int, taken: set[str]) -> bool:
        """Whether ``cabin`` has ``n`` seats not in ``taken`` (where :meth:`choose` would find seats)."""
        keyed = self.keyed.get(cabin)
        if keyed is None or len(keyed) < n:
            return False
        found = 0
        for key, _ in itertools.islice(keyed, self._start(cabin, keyed, taken), None):
            if key not in taken:
                found += 1
                if found == n:
                    return True
        return False

    def choose(self, cabin: str, passengers: list[Passenger], taken: set[str]) -> list[str] | None:
        keyed = self.keyed.get(cabin)
        if not keyed:
            return None
        n = len(passengers)
        start = self._start(cabin, keyed, taken)
        if n == 1:
            # choose_seats' order for one passenger: a liked seat, not a middle one, front rows first
            liked = passengers[0].seat_preference
            other: Seat | None = None
            middle: Seat | None = None
            for key, seat in itertools.islice(keyed, start, None):
                if key in taken:
                    continue
                position = seat.position
                if position == "middle":
                    if middle is None:
                        middle = seat
                elif liked == "any" or liked == position:
                    return [seat.number]
                elif other is None:
                    other = seat
            best = other or middle
            return [best.number] if best is not None else None
        free = [seat for key, seat in itertools.islice(keyed, start, None) if key not in taken]
        if len(free) < n:
            return None
        block: list[Seat] | None = None
        start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i].number[:-1] != free[start].number[:-1]:
                if i - start >= n:
                    block = free[start : start + n]
                    break
                start = i
        if block is None:  # no row has room for all: front-most seats, adjacent rows
            block = free[:n]
        return _assign(block, passengers)


class TakenSeats(set[str]):
    """The seats a case gave out (``<flight id>/<seat>``), remembering how far each flight's seats are taken.

    A case seats its bookings front to back and tries the same flights again and again (the chosen
    itinerary, then the fallbacks) with one set of taken seats, which grows. For each flight and cabin
    the set keeps the index before which every free seat is in it, so the next choice starts there
    instead of reading every seat given out again. Only a growing set keeps it: one that shrank meanwhile
    (seats handed back) is read from the start. The marks die with the set, at the end of the case.
    """

    __slots__ = ("marks",)

    def __init__(self, seats: Iterable[str] = ()) -> None:
        super().__init__(seats)
        #: prepared seats of a flight -> cabin -> (the set's size then, the index)
        self.marks: dict[_FreeSeats, dict[str, tuple[int, int]]] = {}


_NUMBER = operator.attrgetter("number")
_PREPARED: dict[tuple[int, str], tuple[list[Seat], _FreeSeats]] = {}
_PREPARED_MAX = 4096


def _prepared(flight_id: str, free: list[Seat]) -> _FreeSeats:
    """The :class:`_FreeSeats` of ``free`` on ``flight_id`` (a list held while cached, so its id is
    not reused; one list may be shared by two flights with the same seats free)."""
    key = (id(free), flight_id)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is free:
        return hit[1]
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    prepared = _FreeSeats(flight_id, free)
    _PREPARED[key] = (free, prepared)
    return prepared


def _row(seat: Seat) -> int:
    return int(seat.number[:-1])


def choose_seats(free: list[Seat], passengers: list[Passenger]) -> list[str] | None:
    """Seats for ``passengers`` (same order) among ``free``: together in one row when possible,
    each passenger's window / aisle preference where the seats allow, front rows first.

    The definition of the choice; the policy makes it with :class:`_FreeSeats` on seats prepared
    once per reply (``tests/test_flight_policy.py`` checks that the two agree)."""
    n = len(passengers)
    if len(free) < n:
        return None
    if n == 1:
        best = min(free, key=lambda s: (not _likes(passengers[0], s), s.position == "middle", _row(s), s.number))
        return [best.number]
    rows: dict[int, list[Seat]] = defaultdict(list)
    for seat in free:
        rows[_row(seat)].append(seat)
    block: list[Seat] | None = None
    for row in sorted(rows):
        if len(rows[row]) >= n:
            block = sorted(rows[row], key=lambda s: s.number[-1])[:n]
            break
    if block is None:  # no row has room for all: front-most seats, adjacent rows
        block = sorted(free, key=lambda s: (_row(s), s.number[-1]))[:n]
    return _assign(block, passengers)


def _likes(passenger: Passenger, seat: Seat) -> bool:
    return passenger.seat_preference == "any" or passenger.seat_preference == seat.position


def _assign(block: list[Seat], passengers: list[Passenger]) -> list[str]:
    """Give each passenger a seat of ``block``, preferences first, higher tiers choosing first."""
    remaining = list(block)
    out: dict[int, str] = {}
    order = sorted(
        range(len(passengers)),
        key=lambda i: (passengers[i].seat_preference == "any", -TIER_RANK[passengers[i].tier], i),
    )
    for i in order:
        seat = min(remaining, key=lambda s: (not _likes(passengers[i], s), s.number))
        remaining.remove(seat)
        out[i] = seat.number
    return [out[i] for i in range(len(passengers))]


def _seating_note(passengers: list[Passenger], leg: Leg, free: list[Seat]) -> str:
    seats = _prepared(leg.flight_id, free)
    liked = sum(
        1 for p, s in zip(passengers, leg.seats, strict=True) if p.seat_preference in ("any", seats.position(s))
    )
    rows = {s[:-1] for s in leg.seats}
    together = "" if len(passengers) == 1 else (" together in one row" if len(rows) == 1 else " in adjacent rows")
    return f"seats {', '.join(leg.seats)}{together} ({liked}/{len(passengers)} seating preferences met)"


def _what(case: Case, affected: AffectedBooking) -> str:
    d = case.disruption
    if affected.why == "cancelled":
        return f"{d.number} {d.origin}-{d.destination} was cancelled" + (f" ({d.reason})" if d.reason else "")
    if affected.why == "missed_connection":
        late = _duration(d.delay_minutes * 60)
        return f"{d.number} is {late} late, so the connection at {affected.origin} cannot be made"
    return f"{d.number} {d.origin}-{d.destination} is {_duration(d.delay_minutes * 60)} late"


def _hm(t: int) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def _duration(seconds: int) -> str:
    minutes = abs(seconds) // 60
    return f"{minutes // 60}h{minutes % 60:02d}" if minutes >= 60 else f"{minutes} min"


def _money(minor: int, currency: str) -> str:
    return f"{currency} {minor / 100:,.2f}"
