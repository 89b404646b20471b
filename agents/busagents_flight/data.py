"""A seeded, offline generator of an airline day: airports, flights with seat maps,
passengers with loyalty tiers and seating preferences, bookings with connections and fares.

The same ``(flights, passengers, seed)`` always gives the same day, so runs and
tests are reproducible without any network or bundled data file.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
from busagents_travel import Airport, Booking, Fare, Flight, Leg, Passenger, Seat

__all__ = ["DAY_START", "AirlineDay", "generate", "schedule", "seat_map"]

#: Midnight UTC of the simulated day (2026-11-25).
DAY_START = 1_795_564_800
_MIN = 60
_HOUR = 3600

_HUBS = (Airport("LHR", "London", 60), Airport("AMS", "Amsterdam", 50))
_SPOKES = (
    Airport("DUB", "Dublin", 40), Airport("EDI", "Edinburgh", 35), Airport("MAN", "Manchester", 40),
    Airport("CDG", "Paris", 60), Airport("FRA", "Frankfurt", 45), Airport("MUC", "Munich", 35),
    Airport("ZRH", "Zurich", 40), Airport("VIE", "Vienna", 30), Airport("CPH", "Copenhagen", 30),
    Airport("ARN", "Stockholm", 35), Airport("OSL", "Oslo", 35), Airport("HEL", "Helsinki", 35),
    Airport("MAD", "Madrid", 45), Airport("BCN", "Barcelona", 40), Airport("LIS", "Lisbon", 45),
    Airport("FCO", "Rome", 45), Airport("MXP", "Milan", 40), Airport("ATH", "Athens", 40),
    Airport("PRG", "Prague", 30), Airport("WAW", "Warsaw", 30), Airport("BUD", "Budapest", 30),
    Airport("BRU", "Brussels", 40), Airport("GVA", "Geneva", 35), Airport("NCE", "Nice", 35),
    Airport("JFK", "New York", 75), Airport("BOS", "Boston", 60), Airport("YYZ", "Toronto", 70),
    Airport("DXB", "Dubai", 75),
)  # fmt: skip
_LONG_HAUL = {"JFK", "BOS", "YYZ", "DXB"}

# aircraft -> cabins as (cabin, first row, last row, seat letters)
_AIRCRAFT: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    "E190": (("J", 1, 3, "ACD"), ("Y", 4, 25, "ACDF")),
    "A320": (("J", 1, 4, "ACDF"), ("Y", 5, 30, "ABCDEF")),
    "A321": (("J", 1, 5, "ACDF"), ("W", 6, 8, "ABCDEF"), ("Y", 9, 35, "ABCDEF")),
    "B787": (("F", 1, 2, "AFK"), ("J", 3, 10, "ADGK"), ("W", 11, 15, "ACDEGHK"), ("Y", 16, 40, "ABCDEFGHK")),
}
_FARES: dict[str, tuple[Fare, ...]] = {  # per cabin: flexible, standard, saver (per passenger, short haul)
    "F": (Fare("F", "F", 450_000, 0, True),),
    "J": (Fare("J", "J", 120_000, 0, True), Fare("D", "J", 65_000, 15_000, False)),
    "W": (Fare("W", "W", 45_000, 5_000, True), Fare("E", "W", 32_000, 10_000, False)),
    "Y": (Fare("Y", "Y", 30_000, 0, True), Fare("M", "Y", 16_000, 7_000, False), Fare("Q", "Y", 8_900, 12_000, False)),
}
_FIRST = [
    "Anna",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kara",
    "Liam",
    "Mia",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sami",
    "Tara",
    "Ugo",
]
_LAST = [
    "Smith",
    "Jones",
    "Müller",
    "Dubois",
    "Rossi",
    "García",
    "Silva",
    "Jansen",
    "Nowak",
    "Berg",
    "Novak",
    "Costa",
    "Murphy",
    "Weber",
    "Laurent",
    "Horvat",
]


def seat_map(aircraft: str) -> list[Seat]:
    """The seats of an aircraft type, front to back."""
    seats: list[Seat] = []
    for cabin, first, last, letters in _AIRCRAFT[aircraft]:
        for row in range(first, last + 1):
            for i, letter in enumerate(letters):
                if i in (0, len(letters) - 1):
                    position = "window"
                elif _next_to_aisle(letters, i):
                    position = "aisle"
                else:
                    position = "middle"
                seats.append(Seat(f"{row}{letter}", cabin, position))  # type: ignore[arg-type]
    return seats


def _next_to_aisle(letters: str, i: int) -> bool:
    # aisles sit between blocks: ABC|DEF, A|C D|F, ADG K layouts: narrow bodies have one aisle in the middle
    n = len(letters)
    if n <= 4:
        return True
    if n == 6:
        return i in (2, 3)
    if n == 7:
        return i in (1, 2, 4, 5)
    return i in (2, 3, 5, 6)  # 3-3-3


class AirlineDay(msgspec.Struct):
    """Everything the airline knows at the start of the day."""

    seed: int
    airports: list[Airport]
    flights: list[Flight]
    bookings: list[Booking]
    seat_maps: dict[str, list[Seat]]

    @property
    def passenger_count(self) -> int:
        return sum(len(b.passengers) for b in self.bookings)

    def airport(self, code: str) -> Airport:
        for airport in self.airports:
            if airport.code == code:
                return airport
        raise KeyError(code)


@dataclass
class _Inventory:
    """Free seats of one flight, per cabin, in the order they are handed out."""

    free: dict[str, list[Seat]] = field(default_factory=dict)

    def take(self, cabin: str, count: int, rng: random.Random) -> list[Seat] | None:
        seats = self.free.get(cabin)
        if not seats or len(seats) < count:
            return None
        start = rng.randrange(0, len(seats) - count + 1)
        taken = seats[start : start + count]
        del seats[start : start + count]
        return taken


def generate(flights: int = 40, passengers: int = 3000, seed: int = 7) -> AirlineDay:
    """A deterministic airline day with about ``flights`` flights and ``passengers`` passengers."""
    if flights < 4 or passengers < 1:
        raise ValueError("an airline day needs at least 4 flights and 1 passenger")
    rng = random.Random(seed)
    airports = [*_HUBS, *_SPOKES]
    schedule = _schedule(flights, rng)
    maps = {name: seat_map(name) for name in _AIRCRAFT}
    inventory = {f.flight_id: _inventory(maps[f.aircraft]) for f in schedule}
    mct = {a.code: a.mct_minutes * _MIN for a in airports}
    bookings = _with_requests(list(_bookings(schedule, inventory, mct, passengers, rng)), seed)
    return AirlineDay(seed=seed, airports=airports, flights=schedule, bookings=bookings, seat_maps=maps)


def schedule(flights: int = 40, seed: int = 7) -> tuple[list[Flight], dict[str, list[Seat]]]:
    """Only the day's flights and seat maps: the same as :func:`generate` gives, without the bookings."""
    if flights < 4:
        raise ValueError("an airline day needs at least 4 flights")
    return _schedule(flights, random.Random(seed)), {name: seat_map(name) for name in _AIRCRAFT}


def _inventory(seats: list[Seat]) -> _Inventory:
    inv = _Inventory()
    for seat in seats:
        inv.free.setdefault(seat.cabin, []).append(seat)
    return inv


def _schedule(count: int, rng: random.Random) -> list[Flight]:
    """Hub-and-spoke rotations: each route is flown several times a day in both directions."""
    hubs = [h.code for h in _HUBS]
    spokes = [s.code for s in _SPOKES]
    pairs = [(hubs[0], hubs[1])] + [(h, s) for s in rng.sample(spokes, len(spokes)) for h in hubs]
    routes = pairs[: max(2, min(len(pairs), count // 6))]
    durations: dict[tuple[str, str], int] = {}
    flights: list[Flight] = []
    i = 0
    while len(flights) < count:
        hub, other = routes[i % len(routes)]
        origin, destination = (hub, other) if (i // len(routes)) % 2 == 0 else (other, hub)
        i += 1
        long_haul = origin in _LONG_HAUL or destination in _LONG_HAUL
        key = (hub, other)
        if key not in durations:
            durations[key] = rng.randrange(420, 540, 5) * _MIN if long_haul else rng.randrange(55, 200, 5) * _MIN
        duration = durations[key]
        departure = DAY_START + 6 * _HOUR + rng.randrange(0, 16 * 12) * 5 * _MIN
        aircraft = "B787" if long_haul else rng.choice(("E190", "A320", "A320", "A321"))
        number = f"BX{100 + len(flights)}"
        flights.append(
            Flight(f"{number}-25NOV", number, origin, destination, departure, departure + duration, aircraft)
        )
    flights.sort(key=lambda f: (f.departure, f.flight_id))
    return flights


def _bookings(
    schedule: list[Flight],
    inventory: dict[str, _Inventory],
    mct: dict[str, int],
    target: int,
    rng: random.Random,
) -> Iterator[Booking]:
    hubs = {h.code for h in _HUBS}
    by_origin: dict[str, list[Flight]] = {}
    for f in schedule:  # the schedule is sorted by departure
        by_origin.setdefault(f.origin, []).append(f)
    departures = {origin: [f.departure for f in flights] for origin, flights in by_origin.items()}
    made = 0
    attempts = 0
    seq = 0
    while made < target and attempts < target * 4:
        attempts += 1
        size = min(rng.choices((1, 2, 3, 4), cum_weights=(70, 88, 95, 100))[0], target - made)
        first = rng.choice(schedule)
        legs_flights = [first]
        if first.destination in hubs and rng.random() < 0.45:
            onward = by_origin.get(first.destination, [])
            times = departures.get(first.destination, [])
            ready = first.arrival + mct[first.destination]
            lo, hi = bisect.bisect_left(times, ready), bisect.bisect_right(times, ready + 4 * _HOUR)
            window = [f for f in onward[lo:hi] if f.destination != first.origin]
            if window:
                legs_flights.append(rng.choice(window))
        cabin = _pick_cabin(first.aircraft, rng)
        if any(cabin not in inventory[f.flight_id].free for f in legs_flights):
            cabin = "Y"
        taken: list[list[Seat]] = []
        for f in legs_flights:
            seats = inventory[f.flight_id].take(cabin, size, rng)
            if seats is None:
                break
            taken.append(seats)
        if len(taken) != len(legs_flights):
            for f, seats in zip(legs_flights, taken, strict=False):  # give them back
                inventory[f.flight_id].free[cabin].extend(seats)
            continue
        seq += 1
        booking_id = _pnr(seq)
        people = [_passenger(booking_id, i, rng) for i in range(size)]
        fare = rng.choice(_FARES[cabin])
        legs = [
            Leg(
                f.flight_id,
                f.number,
                f.origin,
                f.destination,
                f.departure,
                f.arrival,
                cabin,  # type: ignore[arg-type]
                [s.number for s in seats],
            )
            for f, seats in zip(legs_flights, taken, strict=True)
        ]
        yield Booking(booking_id, people, legs, fare)
        made += size


#: Free-text notes and special service requests that a few passengers leave (what the LLM reasoner
#: judges; the offline policy serves them like any other booking).
_NOTES = (
    "Travelling with a newborn, a bassinet row would help.",
    "My father uses a wheelchair; we need to sit together near the front.",
    "I must be in Boston for a wedding tomorrow at noon, any airport nearby is fine.",
    "Connecting to a cruise ship, please get us there today even if in another cabin.",
    "Medical appointment on arrival: an earlier flight matters more than the seat.",
    "Please keep our group of four together, the children are 6 and 9.",
)
_SSRS = ("WCHR", "WCHS", "BLND", "DEAF", "UMNR", "PETC", "MEDA")
_NOTE_SHARE = 0.02  # of bookings
_SSR_SHARE = 0.015  # of passengers


def _with_requests(bookings: list[Booking], seed: int) -> list[Booking]:
    """Notes on a few bookings and SSRs on a few passengers, from a generator of their own (the
    rest of the day is the same as without them)."""
    rng = random.Random(f"{seed}/requests")
    out: list[Booking] = []
    for booking in bookings:
        note = rng.choice(_NOTES) if rng.random() < _NOTE_SHARE else ""
        people = [
            msgspec.structs.replace(p, ssr=[rng.choice(_SSRS)]) if rng.random() < _SSR_SHARE else p
            for p in booking.passengers
        ]
        if note or people != booking.passengers:
            booking = msgspec.structs.replace(booking, note=note, passengers=people)
        out.append(booking)
    return out


def _pick_cabin(aircraft: str, rng: random.Random) -> str:
    cabins = [c[0] for c in _AIRCRAFT[aircraft]]
    weights = {"F": 1, "J": 8, "W": 10, "Y": 81}
    return rng.choices(cabins, [weights[c] for c in cabins])[0]


def _pnr(seq: int) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    out = []
    n = seq * 7919 + 104729
    for _ in range(6):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out) + f"{seq % 100:02d}"


def _passenger(booking_id: str, i: int, rng: random.Random) -> Passenger:
    tier = rng.choices(("none", "silver", "gold", "platinum"), cum_weights=(70, 87, 96, 100))[0]
    pref = rng.choices(("window", "aisle", "any"), cum_weights=(40, 75, 100))[0]
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    return Passenger(f"{booking_id}-{i + 1}", name, tier, pref)  # type: ignore[arg-type]
