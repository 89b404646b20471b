"""The offline rebooking policy: cabin, seat preference, groups, loyalty tier, fees and waivers."""

from __future__ import annotations

import msgspec
from busagents_flight.policy import OfflinePolicy
from busagents_flight.reasoning import AffectedBooking, Case
from busagents_travel import (
    AlternativeItinerary,
    Booking,
    Disruption,
    Fare,
    Flight,
    Leg,
    Passenger,
    RebookPassenger,
    Seat,
)

H = 3600
DISRUPTED = Flight("BX1-25NOV", "BX1", "LHR", "DUB", 10 * H, 11 * H, "A320")
CANCELLED = Disruption(
    disruption_id="BX1-25NOV#1", kind="cancelled", flight_id="BX1-25NOV", number="BX1", origin="LHR",
    destination="DUB", observed_at=8 * H, reason="technical",
)  # fmt: skip
SAVER = Fare("Q", "Y", 9_000, 12_000, False)
BUSINESS = Fare("J", "J", 120_000, 0, True)


def _flight(n: int, dep_hour: int) -> Flight:
    return Flight(f"BX{n}-25NOV", f"BX{n}", "LHR", "DUB", dep_hour * H, (dep_hour + 1) * H, "A320")


def _seats(*specs: str) -> list[Seat]:
    """'3A:J:window' -> Seat."""
    out = []
    for spec in specs:
        number, cabin, position = spec.split(":")
        out.append(Seat(number, cabin, position))  # type: ignore[arg-type]
    return out


def _booking(booking_id: str, *people: Passenger, fare: Fare = SAVER) -> Booking:
    f = DISRUPTED
    seats = [f"{20 + i}C" for i in range(len(people))]
    leg = Leg(f.flight_id, f.number, f.origin, f.destination, f.departure, f.arrival, fare.cabin, seats)
    return Booking(booking_id, list(people), [leg], fare)


def _pax(pid: str, tier: str = "none", pref: str = "any") -> Passenger:
    return Passenger(pid, f"P {pid}", tier, pref)  # type: ignore[arg-type]


def _case(bookings: list[Booking], itineraries: list[AlternativeItinerary], taken: list[str] = []) -> Case:  # noqa: B006
    affected = [
        AffectedBooking(
            booking=b, why="cancelled", replaces=[DISRUPTED.flight_id], origin="LHR", destination="DUB",
            not_before=9 * H, current_arrival=None,
        ).with_search(CANCELLED)
        for b in bookings
    ]  # fmt: skip
    return Case(
        disruption=CANCELLED,
        affected=affected,
        alternatives={a.search: itineraries for a in affected},
        taken_seats=taken,
    )


def _it(flight: Flight, seats: list[Seat]) -> AlternativeItinerary:
    return AlternativeItinerary(flights=[flight], free_seats=[seats], arrival=flight.arrival)


async def _decide(case: Case) -> dict[str, RebookPassenger]:
    async def no_lookup(*args: object) -> list[AlternativeItinerary]:
        return []

    return {d.booking_id: d for d in await OfflinePolicy().decide(case, no_lookup)}


async def test_earliest_arrival_in_the_booked_cabin_wins_over_a_downgrade() -> None:
    early, later = _flight(2, 12), _flight(3, 15)
    case = _case(
        [_booking("J1", _pax("J1-1"), fare=BUSINESS)],
        [_it(early, _seats("20A:Y:window")), _it(later, _seats("2A:J:window", "21A:Y:window"))],
    )
    decision = (await _decide(case))["J1"]
    assert decision.action == "rebook"
    leg = decision.new_legs[0]
    assert (leg.flight_id, leg.cabin, leg.seats) == (later.flight_id, "J", ["2A"])


async def test_a_downgrade_is_the_last_resort_and_refunds_half_the_fare() -> None:
    case = _case([_booking("J1", _pax("J1-1"), fare=BUSINESS)], [_it(_flight(2, 12), _seats("20A:Y:window"))])
    decision = (await _decide(case))["J1"]
    assert decision.new_legs[0].cabin == "Y"
    assert decision.cost.refund == BUSINESS.price // 2


async def test_seat_preferences_are_met_where_seats_allow() -> None:
    seats = _seats("20A:Y:window", "20B:Y:middle", "20C:Y:aisle")
    case = _case(
        [_booking("W", _pax("W-1", pref="window")), _booking("A", _pax("A-1", pref="aisle"))],
        [_it(_flight(2, 12), seats)],
    )
    decisions = await _decide(case)
    assert decisions["W"].new_legs[0].seats == ["20A"]
    assert decisions["A"].new_legs[0].seats == ["20C"]


async def test_a_family_travels_together_in_one_row() -> None:
    scattered = _seats("5A:Y:window", "7C:Y:aisle", "9F:Y:window", "12A:Y:window", "12B:Y:middle", "12C:Y:aisle")
    family = _booking("FAM", _pax("FAM-1", pref="window"), _pax("FAM-2"), _pax("FAM-3", pref="aisle"))
    case = _case([family], [_it(_flight(2, 12), scattered)])
    decision = (await _decide(case))["FAM"]
    assert decision.new_legs[0].seats == ["12A", "12B", "12C"]
    assert len(decision.new_legs) == 1


async def test_a_family_is_not_split_across_flights() -> None:
    family = _booking("FAM", _pax("FAM-1"), _pax("FAM-2"))
    case = _case(
        [family],
        [_it(_flight(2, 12), _seats("5A:Y:window")), _it(_flight(3, 14), _seats("8A:Y:window", "8B:Y:middle"))],
    )
    decision = (await _decide(case))["FAM"]
    assert decision.new_legs[0].flight_id == "BX3-25NOV"


async def test_the_higher_loyalty_tier_gets_the_last_seat_on_the_earliest_flight() -> None:
    early, later = _flight(2, 12), _flight(3, 16)
    case = _case(
        [_booking("AAA", _pax("AAA-1")), _booking("ZZZ", _pax("ZZZ-1", tier="gold"))],
        [_it(early, _seats("20A:Y:window")), _it(later, _seats("30A:Y:window"))],
    )
    decisions = await _decide(case)
    assert decisions["ZZZ"].new_legs[0].flight_id == early.flight_id
    assert decisions["AAA"].new_legs[0].flight_id == later.flight_id


async def test_a_seat_known_taken_is_never_assigned_and_nothing_left_means_a_refund() -> None:
    early = _flight(2, 12)
    case = _case([_booking("B1", _pax("B1-1"))], [_it(early, _seats("20A:Y:window"))], taken=[f"{early.flight_id}/20A"])
    decision = (await _decide(case))["B1"]
    assert decision.action == "refund"
    assert decision.cost.refund == SAVER.price


async def test_the_change_fee_is_waived_when_the_airline_caused_the_change() -> None:
    pair = _booking("P2", _pax("P2-1"), _pax("P2-2"))
    case = _case([pair], [_it(_flight(2, 12), _seats("20A:Y:window", "20B:Y:middle"))])
    decision = (await _decide(case))["P2"]
    cost = decision.cost
    assert cost.change_fee == 2 * SAVER.change_fee
    assert cost.waived and cost.payable == 0
    assert "waived" in decision.rationale


async def test_a_rebooking_offers_its_next_choices_with_room_on_the_same_terms_as_fallbacks() -> None:
    early, upgrade, later, latest, last = (_flight(n, 10 + n) for n in range(2, 7))
    itineraries = [
        _it(early, _seats("10A:Y:window", "2A:J:window")),  # its J seat: the rebooker's own upgrade
        _it(upgrade, _seats("2A:J:window")),  # no Y seat, a J one: an upgrade is fine
        _it(later, _seats("11A:Y:window", "11B:Y:middle", "7A:W:window")),  # its Y seat, not also its W one
        _it(latest, _seats("12C:Y:aisle")),
        _it(last, _seats("14C:Y:aisle")),
        _it(_flight(7, 17), _seats("15C:Y:aisle")),
        _it(_flight(8, 18), _seats("16C:Y:aisle")),
        _it(_flight(9, 19), _seats("17C:Y:aisle")),
    ]
    decision = (await _decide(_case([_booking("B1", _pax("p1"))], itineraries)))["B1"]
    assert decision.new_legs[0].flight_id == early.flight_id
    fallbacks = [(legs[0].flight_id, legs[0].cabin) for legs in decision.fallbacks]
    assert fallbacks == [
        (upgrade.flight_id, "J"),
        (later.flight_id, "Y"),
        (latest.flight_id, "Y"),
    ]  # the policy's own order, one per itinerary, at most three
    assert all(legs[0].seats == [] for legs in decision.fallbacks)  # the store seats the group if one is taken


def test_a_rebooking_chosen_elsewhere_gets_the_policys_choices_on_its_terms_other_than_its_own_as_fallbacks() -> None:
    # a model chose the third itinerary: the fallbacks are the policy's order without it, the earlier
    # ones included (they had room when the choice was made), none without room left by the seats taken
    early, upgrade, chosen, latest, last = (_flight(n, 10 + n) for n in range(2, 7))
    itineraries = [
        _it(early, _seats("10A:Y:window")),
        _it(upgrade, _seats("2A:J:window")),
        _it(chosen, _seats("11A:Y:window")),
        _it(latest, _seats("12C:Y:aisle")),  # taken below by a decision made before
        _it(last, _seats("14C:Y:aisle")),
        _it(_flight(7, 17), _seats("15C:Y:aisle")),
    ]
    case = _case([_booking("B1", _pax("p1"))], itineraries)
    (affected,) = case.affected
    taken = {f"{chosen.flight_id}/11A", f"{latest.flight_id}/12C"}
    fallbacks = OfflinePolicy().fallbacks(case, affected, itineraries[2], "Y", taken)
    assert [(legs[0].flight_id, legs[0].cabin) for legs in fallbacks] == [
        (early.flight_id, "Y"),
        (upgrade.flight_id, "J"),
        (last.flight_id, "Y"),
    ]
    assert all(legs[0].seats == [] for legs in fallbacks)
    # a choice that downgrades (half the fare refunded) falls back on downgrades only
    business = _case([_booking("J1", _pax("J1-1"), fare=BUSINESS)], itineraries)
    (j1,) = business.affected
    down = OfflinePolicy().fallbacks(business, j1, itineraries[2], "Y", taken)
    assert [legs[0].flight_id for legs in down] == [early.flight_id, last.flight_id, "BX7-25NOV"]
    assert {legs[0].cabin for legs in down} == {"Y"}  # not the J seat of the second: other terms


async def test_a_downgrade_offers_only_downgrades_as_fallbacks() -> None:
    early, later = _flight(2, 12), _flight(3, 13)
    case = _case(
        [_booking("J1", _pax("J1-1"), fare=BUSINESS)],
        [_it(early, _seats("20A:Y:window")), _it(later, _seats("21A:Y:window", "3A:J:window"))],
    )
    decision = (await _decide(case))["J1"]
    assert (decision.new_legs[0].flight_id, decision.new_legs[0].cabin) == (later.flight_id, "J")
    assert decision.fallbacks == []  # the Y seats are downgrades: other terms (half the fare refunded)


def test_seats_chosen_from_a_prepared_reply_are_the_ones_choose_seats_picks() -> None:
    """The policy splits a reply's free seats by cabin and orders them once per reply; what it picks
    for a booking must be what ``choose_seats`` picks among the seats still free, in any order the
    seats come in, for any preference and group size."""
    import random

    from busagents_flight.data import seat_map
    from busagents_flight.policy import _prepared, choose_seats

    rng = random.Random(5)
    tiers, likes = ("none", "silver", "gold", "platinum"), ("any", "window", "aisle")
    checked = 0
    for aircraft in ("E190", "A321", "B787"):
        seats = seat_map(aircraft)
        for trial in range(300):
            free = [s for s in seats if rng.random() < 0.6]
            if trial % 3 == 0:
                rng.shuffle(free)  # not in seat-map order: still the same choice
            flight_id = f"BX{trial}-25NOV"
            taken = {f"{flight_id}/{s.number}" for s in free if rng.random() < 0.5}
            taken.add(f"OTHER-25NOV/{free[0].number}" if free else "OTHER-25NOV/1A")  # another flight's seat
            cabin = rng.choice([s.cabin for s in seats])
            group = [
                Passenger(f"P{i}", f"Name {i}", rng.choice(tiers), rng.choice(likes))  # type: ignore[arg-type]
                for i in range(rng.choice((1, 1, 2, 3, 4, 6)))
            ]
            expected = choose_seats(
                [s for s in free if s.cabin == cabin and f"{flight_id}/{s.number}" not in taken], group
            )
            assert _prepared(flight_id, free).choose(cabin, group, taken) == expected, (aircraft, trial)
            checked += expected is not None
    assert checked > 500  # most trials found seats: the comparison is not between two Nones


def test_one_free_seat_list_shared_by_two_flights_is_checked_against_each_flights_taken_seats() -> None:
    """The reasoner shares one decoded list between flights with the same seats free: a seat given
    out on one flight is still free on the other."""
    from busagents_flight.policy import _prepared

    free = _seats("5A:Y:window", "5B:Y:middle", "5C:Y:aisle")
    alice = [Passenger("P1", "Alice", "none", "window")]
    taken = {"BX7-25NOV/5A"}
    assert _prepared("BX7-25NOV", free).choose("Y", alice, taken) == ["5C"]  # 5A given out on BX7
    assert _prepared("BX8-25NOV", free).choose("Y", alice, taken) == ["5A"]  # ... not on BX8
    taken.add("BX8-25NOV/5A")
    assert _prepared("BX7-25NOV", free).choose("Y", alice, taken) == ["5C"]


def test_the_reasoner_decodes_each_distinct_free_seat_list_once() -> None:
    """Replies naming a flight with the same seats free share one decoded list; another list is
    decoded on its own; a list that is not seats fails the query with the reason."""
    import msgspec
    import pytest
    from busagents_flight.reasoner import SeatLists

    from busagents import QueryFailedError

    lists = SeatLists(size=2)
    one = msgspec.json.encode(_seats("5A:Y:window", "5B:Y:middle"))
    other = msgspec.json.encode(_seats("1A:J:window"))
    first = lists.of(msgspec.Raw(one))
    assert [s.number for s in first] == ["5A", "5B"] and first[0].position == "window"
    assert lists.of(msgspec.Raw(bytes(one))) is first  # the same JSON from another reply
    assert [s.number for s in lists.of(msgspec.Raw(other))] == ["1A"]
    assert (lists.decoded, lists.shared) == (2, 1)
    with pytest.raises(QueryFailedError, match="invalid free seats"):
        lists.of(msgspec.Raw(b'[{"number": 5}]'))
    lists.of(msgspec.Raw(msgspec.json.encode(_seats("2A:J:window"))))  # a third list: full, so it starts over
    assert lists.of(msgspec.Raw(one)) is not first and lists.decoded == 4


async def test_the_reasoners_check_reads_shared_free_seat_lists_for_each_flight() -> None:
    """One decoded list shared by two flights' itineraries: a backend's seat is checked against the
    free seats of its own flight; a decision with a seat that is not free is replaced by the policy's."""
    from busagents_flight.reasoner import ReasonerAgent

    first, second = _flight(2, 12), _flight(3, 13)
    shared = _seats("20A:Y:window", "20B:Y:middle")  # the same list object on both flights
    case = _case(
        [_booking("B1", _pax("B1-1")), _booking("B2", _pax("B2-1"))], [_it(first, shared), _it(second, shared)]
    )
    policy = await _decide(case)

    def moved(booking_id: str, flight: Flight, seat: str) -> RebookPassenger:
        leg = Leg(flight.flight_id, flight.number, flight.origin, flight.destination, flight.departure,
                  flight.arrival, "Y", [seat])  # fmt: skip
        return msgspec.structs.replace(policy[booking_id], new_legs=[leg], reasoner="backend")

    async def no_lookup(*args: object) -> list[AlternativeItinerary]:
        return []

    agent = ReasonerAgent("offline")
    cache = {a.search: its for a in case.affected for its in [case.alternatives[a.search]]}
    checked = agent._check(case, [moved("B1", second, "20B"), moved("B2", second, "20C")], cache, no_lookup)
    by_booking = {d.booking_id: d for d in checked}
    assert by_booking["B1"].reasoner == "backend" and by_booking["B1"].new_legs[0].seats == ["20B"]
    assert by_booking["B2"].reasoner == "offline"  # 20C is not free on that flight: replaced
    assert agent.replaced == 1


def test_a_growing_set_of_taken_seats_reused_across_choices_gives_choose_seats_picks_each_time() -> None:
    """A case seats booking after booking with one growing set of taken seats (``TakenSeats``), which
    remembers where each flight's taken seats end; every choice must still be ``choose_seats``' among the
    seats free at that moment, and a set that shrank meanwhile (seats handed back) must be read again."""
    import random

    from busagents_flight.data import seat_map
    from busagents_flight.policy import TakenSeats, _prepared, choose_seats

    rng = random.Random(11)
    likes = ("any", "window", "aisle")
    seats = seat_map("A321")
    flight_id = "BX9-25NOV"
    free = [s for s in seats if rng.random() < 0.8]
    prepared = _prepared(flight_id, free)
    taken = TakenSeats()
    chosen = 0
    for step in range(400):
        if step % 50 == 49 and taken:  # seats handed back: the set shrinks
            for key in rng.sample(sorted(taken), min(len(taken), 6)):
                taken.discard(key)
        cabin = rng.choice(("Y", "Y", "Y", "J"))
        group = [
            Passenger(f"P{i}", f"Name {i}", "none", rng.choice(likes))  # type: ignore[arg-type]
            for i in range(rng.choice((1, 1, 2, 3)))
        ]
        expected = choose_seats([s for s in free if s.cabin == cabin and f"{flight_id}/{s.number}" not in taken], group)
        assert prepared.choose(cabin, group, taken) == expected, step
        if expected is not None:
            taken.update(f"{flight_id}/{n}" for n in expected)
            chosen += 1
    assert chosen > 100  # seats were given out until cabins filled up
