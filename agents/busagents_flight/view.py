"""The live view of the airline day that reasoning needs: a materialised view fed from events.

It starts from the day's snapshot (schedule, seat maps, bookings) and is kept
current by ``FlightStatusUpdated`` (estimated times, cancellations) and
``BookingChanged`` (seats released and taken, legs replaced). The context agent
answers the typed queries from it.
"""

from __future__ import annotations

import bisect
import operator
from collections import defaultdict

import msgspec
from busagents_travel import (
    AlternativeItinerary,
    Booking,
    BookingChanged,
    Flight,
    FlightStatusUpdated,
    OnwardConnection,
    Seat,
)

from .data import AirlineDay

__all__ = ["LiveView"]

_MAX_CONNECTION_WAIT = 6 * 3600
_MAX_DELAY = 8 * 3600  # a flight scheduled this long before may still be waiting to leave
_encode = msgspec.json.Encoder().encode
_DEPARTURE = operator.attrgetter("departure")


class LiveView:
    """Flights with estimated times, seats taken, bookings by flight; answers context queries."""

    def __init__(self, day: AirlineDay) -> None:
        self.flights: dict[str, Flight] = {f.flight_id: f for f in day.flights}
        self.mct: dict[str, int] = {a.code: a.mct_minutes for a in day.airports}
        self.cities: dict[str, str] = {a.code: a.city for a in day.airports}
        self.seat_maps = day.seat_maps
        self.cancelled: set[str] = set()
        self.last_seq: dict[str, int] = {}
        self.status: dict[str, FlightStatusUpdated] = {}  # flight id -> the newest update of the feed
        self.bookings: dict[str, Booking] = {}
        self.by_flight: dict[str, set[str]] = defaultdict(set)
        self.by_passenger: dict[str, list[str]] = defaultdict(list)  # passenger id -> booking ids
        self.changes: dict[str, list[BookingChanged]] = {}  # booking id -> the changes applied, in order
        self.taken: dict[str, set[str]] = defaultdict(set)  # flight id -> seat numbers
        self._routes: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)  # -> (sched dep, id)
        self._served: dict[str, set[str]] = defaultdict(set)  # origin -> destinations flown to
        #: flight id -> (departure, arrival) as now estimated (scheduled until an update says otherwise)
        self._times: dict[str, tuple[int, int]] = {f.flight_id: (f.departure, f.arrival) for f in day.flights}
        self._seats: dict[str, int] = {f.flight_id: len(day.seat_maps[f.aircraft]) for f in day.flights}
        #: flight id -> its free seats, kept until a booking change takes or releases one of them:
        #: the alternatives of many queries share flights, and seats move far less often than they are read
        self._free: dict[str, list[Seat]] = {}
        self._free_json: dict[str, msgspec.Raw] = {}  # the same lists as JSON, as the replies carry them
        for f in day.flights:
            self._routes[f.origin, f.destination].append((f.departure, f.flight_id))
            self._served[f.origin].add(f.destination)
        for deps in self._routes.values():
            deps.sort()
        for booking in day.bookings:
            self._add(booking)
            for p in booking.passengers:
                self.by_passenger[p.passenger_id].append(booking.booking_id)

    # Feeding

    def _add(self, booking: Booking) -> None:
        self.bookings[booking.booking_id] = booking
        if booking.status != "active":
            return
        for leg in booking.legs:
            self.by_flight[leg.flight_id].add(booking.booking_id)
            self.taken[leg.flight_id].update(leg.seats)
            self._free.pop(leg.flight_id, None)
            self._free_json.pop(leg.flight_id, None)

    def apply_status(self, update: FlightStatusUpdated) -> None:
        if update.seq <= self.last_seq.get(update.flight_id, 0):
            return  # repeated or stale
        self.last_seq[update.flight_id] = update.seq
        self.status[update.flight_id] = update
        if update.status == "cancelled":
            self.cancelled.add(update.flight_id)
        elif update.estimated_departure is not None and update.estimated_arrival is not None:
            self._times[update.flight_id] = (update.estimated_departure, update.estimated_arrival)

    def apply_change(self, change: BookingChanged) -> None:
        current = self.bookings.get(change.booking_id)
        if current is None or current.version >= change.version:
            return  # unknown or already applied
        self.changes.setdefault(change.booking_id, []).append(change)
        status = "refunded" if change.action == "refund" else current.status
        legs = current.legs
        if status == "active":
            replaced = {o.flight_id for o in change.old_legs}
            legs = sorted([*(leg for leg in legs if leg.flight_id not in replaced), *change.new_legs], key=_DEPARTURE)
        updated = Booking(change.booking_id, current.passengers, legs, current.fare, status, change.version)
        self.bookings[change.booking_id] = updated
        # only what moved: a leg the booking keeps as it was (all of them, for a "keep") keeps its flight's
        # taken seats and the free-seat lists built from them
        before = current.legs if current.status == "active" else []
        after = legs if status == "active" else []
        gone = [leg for leg in before if leg not in after]
        came = [leg for leg in after if leg not in before]
        for leg in gone:
            self.taken[leg.flight_id].difference_update(leg.seats)
            self._free.pop(leg.flight_id, None)
            self._free_json.pop(leg.flight_id, None)
        for leg in came:
            self.taken[leg.flight_id].update(leg.seats)
            self._free.pop(leg.flight_id, None)
            self._free_json.pop(leg.flight_id, None)
        flights = {leg.flight_id for leg in after}
        for leg in gone:
            if leg.flight_id not in flights:
                self.by_flight[leg.flight_id].discard(change.booking_id)
        for leg in came:
            self.by_flight[leg.flight_id].add(change.booking_id)

    # Answers

    def times(self, flight_id: str) -> tuple[int, int]:
        return self._times[flight_id]

    def bookings_of(self, passenger_id: str) -> list[Booking]:
        """Every booking naming ``passenger_id`` (refunded ones too), as they are now."""
        return [self.bookings[b] for b in self.by_passenger.get(passenger_id, ())]

    def changes_of(self, passenger_id: str) -> list[BookingChanged]:
        """The changes applied to the bookings naming ``passenger_id``, each booking's in order."""
        return [c for b in self.by_passenger.get(passenger_id, ()) for c in self.changes.get(b, ())]

    def bookings_on(self, flight_id: str) -> list[Booking]:
        ids = self.by_flight.get(flight_id, ())
        return [self.bookings[b] for b in sorted(ids)]

    def onward(self, flight_id: str) -> tuple[int, list[OnwardConnection]]:
        """The arrival airport's MCT and the onward flights this flight's passengers connect to."""
        flight = self.flights.get(flight_id)
        if flight is None:
            return 0, []
        counts: dict[str, int] = defaultdict(int)
        for booking in self.bookings_on(flight_id):
            for i, leg in enumerate(booking.legs[:-1]):
                if leg.flight_id == flight_id:
                    counts[booking.legs[i + 1].flight_id] += len(booking.passengers)
        connections = [
            OnwardConnection(flight_id=fid, departure=self.times(fid)[0], passengers=n)
            for fid, n in sorted(counts.items())
            if fid not in self.cancelled
        ]
        return self.mct.get(flight.destination, 0), connections

    def free_seats(self, flight_id: str) -> list[Seat]:
        """The seats of ``flight_id`` no booking holds, front to back (a list shared until seats move:
        do not change it)."""
        free = self._free.get(flight_id)
        if free is None:
            taken = self.taken.get(flight_id, set())
            seats = self.seat_maps[self.flights[flight_id].aircraft]
            free = self._free[flight_id] = [s for s in seats if s.number not in taken]
        return free

    def free_seats_json(self, flight_id: str) -> msgspec.Raw:
        """:meth:`free_seats` as JSON, encoded once until seats move."""
        raw = self._free_json.get(flight_id)
        if raw is None:
            raw = self._free_json[flight_id] = msgspec.Raw(_encode(self.free_seats(flight_id)))
        return raw

    def _free_count(self, flight_id: str, cabin: str | None) -> int:
        if cabin is None:
            return self._seats[flight_id] - len(self.taken.get(flight_id, ()))
        return sum(1 for s in self.free_seats(flight_id) if s.cabin == cabin)

    def _flights(self, origin: str, destination: str, not_before: int, latest: int) -> list[str]:
        """Flights on one route scheduled up to ``latest``, including earlier ones delayed past ``not_before``."""
        deps = self._routes.get((origin, destination))
        if not deps:
            return []
        start = bisect.bisect_left(deps, (not_before - _MAX_DELAY, ""))
        end = bisect.bisect_right(deps, (latest, "\uffff"))
        return [fid for _, fid in deps[start:end]]

    def alternatives(
        self,
        origin: str,
        destination: str,
        not_before: int,
        *,
        exclude: set[str] | None = None,
        cabin: str | None = None,
        min_free: int = 1,
        limit: int = 8,
    ) -> list[AlternativeItinerary]:
        """Direct and one-stop itineraries, earliest arrival first, with seats free on every flight."""
        found = self.itineraries(
            origin, destination, not_before, exclude=exclude, cabin=cabin, min_free=min_free, limit=limit
        )
        return [
            AlternativeItinerary(
                flights=[self.estimated_flight(fid) for fid in ids],
                free_seats=[self.free_seats(fid) for fid in ids],
                arrival=arrival,
            )
            for arrival, ids in found
        ]

    def itineraries(
        self,
        origin: str,
        destination: str,
        not_before: int,
        *,
        exclude: set[str] | None = None,
        cabin: str | None = None,
        min_free: int = 1,
        limit: int = 8,
    ) -> list[tuple[int, list[str]]]:
        """:meth:`alternatives` as (estimated arrival, flight ids)."""
        exclude = exclude or set()
        found: list[tuple[int, int, list[str]]] = []
        horizon = not_before + 36 * 3600
        times, cancelled, seats, taken = self._times, self.cancelled, self._seats, self.taken
        empty: set[str] = set()

        def ok(fid: str, after: int) -> bool:
            if fid in exclude or fid in cancelled or times[fid][0] < after:
                return False
            if cabin is None:
                return seats[fid] - len(taken.get(fid, empty)) >= min_free
            return self._free_count(fid, cabin) >= min_free

        for fid in self._flights(origin, destination, not_before, horizon):
            if ok(fid, not_before):
                dep, arr = times[fid]
                found.append((arr, dep, [fid]))
        for via in self._served.get(origin, ()):
            if via in (origin, destination) or (via, destination) not in self._routes:
                continue
            ready_min = self.mct.get(via, 60) * 60
            for fid in self._flights(origin, via, not_before, horizon):
                if not ok(fid, not_before):
                    continue
                dep, arr = times[fid]
                ready = arr + ready_min
                for fid2 in self._flights(via, destination, ready, ready + _MAX_CONNECTION_WAIT):
                    if ok(fid2, ready):
                        found.append((times[fid2][1], dep, [fid, fid2]))
        found.sort(key=lambda t: (t[0], -t[1], len(t[2])))
        return [(arrival, ids) for arrival, _, ids in found[:limit]]

    def estimated_flight(self, flight_id: str) -> Flight:
        """``flight_id`` with its times as now estimated."""
        f = self.flights[flight_id]
        departure, arrival = self._times[flight_id]
        if departure == f.departure and arrival == f.arrival:
            return f
        return Flight(f.flight_id, f.number, f.origin, f.destination, departure, arrival, f.aircraft)
