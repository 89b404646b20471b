"""The flight assistant's contracts: events, the rebooking command, and the context queries.

Flow: a status feed publishes ``FlightStatusUpdated``; the monitor turns the ones
that matter into ``FlightDelayed`` / ``FlightCancelled`` (disruptions); the
reasoner asks the context agent (``BookingsOnFlight``, ``Alternatives``) and decides
one ``RebookPassenger`` per affected booking, sent in groups (``RebookGroup``: the
decisions of one disruption travel together, not one message each); the rebooker applies
them and publishes what changed as ``BookingsChanged`` (one ``BookingChanged`` per booking,
a group's together) or ``RebookRejected`` per decision, which the reasoner re-decides; the
notifier tells every passenger (``PassengerNotified``). The concierge answers a traveller's
``PassengerAsked`` with ``PassengerAnswered``, from the context agent's passenger queries
(``PassengerBookings``, ``FlightInfo``, ``FareRules``, ``PassengerPreferences``, ``Alternatives``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from busagents import Durability, command, event, query

from .model import Booking, Fare, Flight, Leg, Passenger, Seat

#: Searches of one ``AlternativesMany`` at most.
MAX_SEARCHES = 64

__all__ = [
    "STATUS_FEED",
    "AlternativeItinerary",
    "Alternatives",
    "AlternativesReply",
    "BookingChanged",
    "BookingsChanged",
    "BookingsOnFlight",
    "BookingsOnFlightReply",
    "Cost",
    "Disruption",
    "DisruptionAssessed",
    "FareRules",
    "FareRulesReply",
    "FlightCancelled",
    "FlightDelayed",
    "FlightInfo",
    "FlightInfoReply",
    "FlightStatus",
    "FlightStatusUpdated",
    "OnwardConnection",
    "OnwardConnections",
    "OnwardConnectionsReply",
    "PassengerAnswered",
    "PassengerAsked",
    "PassengerBookings",
    "PassengerBookingsReply",
    "PassengerNotified",
    "PassengerPreferences",
    "PassengerPreferencesReply",
    "RebookAction",
    "RebookGroup",
    "RebookPassenger",
    "RebookRejected",
]

FlightStatus = Literal["scheduled", "boarding", "departed", "arrived", "delayed", "cancelled", "gate_changed"]
RebookAction = Literal["rebook", "refund", "keep"]


# Continuous awareness

#: The status feed is kept in a stream partitioned by flight: the monitor's replicas handle one
#: flight's updates in order (one in flight per partition), and every context replica replays it.
STATUS_FEED = Durability(ordered_partitions=16, max_age=2 * 24 * 3600.0, ack_wait=10.0)


@event("travel.flight.status", key="flight_id", durable=STATUS_FEED)
class FlightStatusUpdated(msgspec.Struct, kw_only=True):
    """One update of the operational status feed; may repeat, arrive late or out of order."""

    flight_id: str
    number: str
    origin: str
    destination: str
    scheduled_departure: int
    scheduled_arrival: int
    status: FlightStatus
    seq: int  # per-flight sequence number of the feed: higher is newer
    observed_at: int  # epoch seconds (simulated clock)
    estimated_departure: int | None = None
    estimated_arrival: int | None = None
    gate: str | None = None
    reason: str = ""


@event("travel.flight.delayed", key="flight_id", durable=True)
class FlightDelayed(msgspec.Struct, kw_only=True):
    """A delay that matters: beyond the rebooking threshold, or breaking onward connections."""

    disruption_id: str
    flight_id: str
    number: str
    origin: str
    destination: str
    delay_minutes: int
    estimated_departure: int
    estimated_arrival: int
    missed_connections: list[str] = []  # onward flight ids that can no longer be made
    long_delay: bool = False  # beyond the rebooking threshold: every passenger may be rebooked
    observed_at: int = 0


@event("travel.flight.cancelled", key="flight_id", durable=True)
class FlightCancelled(msgspec.Struct, kw_only=True):
    """A cancelled flight: every passenger on it is affected (or only ``bookings``, when given)."""

    disruption_id: str
    flight_id: str
    number: str
    origin: str
    destination: str
    reason: str = ""
    observed_at: int = 0
    #: Only these bookings: they were moved onto the flight after it was cancelled.
    bookings: list[str] = []


@event("travel.disruption.assessed", key="flight_id", durable=True)
class DisruptionAssessed(msgspec.Struct, kw_only=True):
    """The reasoner's count of who a disruption affects: each of them will be notified."""

    disruption_id: str
    flight_id: str
    affected_bookings: int
    affected_passengers: int


# Reasoning and acting


class Disruption(msgspec.Struct, frozen=True, kw_only=True):
    """A disruption in one shape for reasoning, whichever event reported it."""

    disruption_id: str
    kind: Literal["cancelled", "delayed"]
    flight_id: str
    number: str
    origin: str
    destination: str
    observed_at: int
    delay_minutes: int = 0
    estimated_departure: int | None = None
    estimated_arrival: int | None = None
    missed_connections: list[str] = []
    long_delay: bool = False
    reason: str = ""
    bookings: list[str] = []  # only these bookings are affected (empty: every booking on the flight)

    @classmethod
    def of(cls, event: FlightDelayed | FlightCancelled) -> Disruption:
        if isinstance(event, FlightCancelled):
            return cls(
                disruption_id=event.disruption_id,
                kind="cancelled",
                flight_id=event.flight_id,
                number=event.number,
                origin=event.origin,
                destination=event.destination,
                observed_at=event.observed_at,
                reason=event.reason,
                bookings=event.bookings,
            )
        return cls(
            disruption_id=event.disruption_id,
            kind="delayed",
            flight_id=event.flight_id,
            number=event.number,
            origin=event.origin,
            destination=event.destination,
            observed_at=event.observed_at,
            delay_minutes=event.delay_minutes,
            estimated_departure=event.estimated_departure,
            estimated_arrival=event.estimated_arrival,
            missed_connections=event.missed_connections,
            long_delay=event.long_delay,
        )


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    """What a change costs the passengers under the fare's change policy (minor units, whole booking)."""

    change_fee: int = 0
    fare_difference: int = 0
    refund: int = 0
    waived: bool = False  # the airline caused the change: fees waived
    currency: str = "EUR"

    @property
    def payable(self) -> int:
        return 0 if self.waived else self.change_fee + self.fare_difference


@command("travel.booking.rebook", key="booking_id", durable=True)
class RebookPassenger(msgspec.Struct, kw_only=True):
    """The reasoner's decision for one booking's passengers, to be applied by the rebooker.

    ``rebook`` replaces the legs ``replaces`` (flight ids) by ``new_legs`` (with the
    chosen seats, in the order of ``passenger_ids``); ``refund`` cancels the booking;
    ``keep`` changes nothing (the passengers stay on the delayed flight). The
    decision is valid only against booking version ``expected_version``.

    The rebooker settles the seats: a proposed seat sold meanwhile is replaced by a
    free one of the same cabin. When the cabin has no room left for the group, it
    takes the first of ``fallbacks`` (other itineraries the reasoner accepts on the
    same terms, in order of preference) that has room, before it rejects the decision.
    A leg without seats (``seats=[]``) asks the rebooker to seat the group in its cabin,
    by the policy's rules, among the seats free when it books (the offline policy's
    fallbacks come so).
    """

    decision_id: str  # unique per decision: the rebooker is idempotent on it
    disruption: Disruption
    booking_id: str
    action: RebookAction
    passenger_ids: list[str]
    replaces: list[str] = []
    new_legs: list[Leg] = []
    fallbacks: list[list[Leg]] = []  # itineraries to take, in order, when new_legs' cabin is full
    expected_version: int = 0
    cost: Cost = Cost()
    hotel: bool = False  # overnight: the airline provides a hotel
    rationale: str = ""
    attempt: int = 1
    reasoner: str = ""

    def shadow_decisions(self) -> dict[str, object]:
        """What was decided for the booking, as ``busagents shadow report`` compares it."""
        return {self.booking_id: _decided(self)}


@command("travel.booking.rebook-group", durable=True)
class RebookGroup(msgspec.Struct, kw_only=True):
    """Several decisions (of one disruption, as a rule) for the rebooker to apply together.

    Each is applied as if it came alone (its own checks, atomicity and idempotency on its
    ``decision_id``); the group only saves a message, a store transaction and an
    acknowledgement per booking. ``group_id`` is unique per group and names its outcomes.
    """

    group_id: str
    decisions: list[RebookPassenger]

    def shadow_decisions(self) -> dict[str, object]:
        """The group's decisions by booking, as ``busagents shadow report`` compares them."""
        return {d.booking_id: _decided(d) for d in self.decisions}


def _decided(d: RebookPassenger) -> dict[str, object]:
    """A decision's substance: rebook or refund or keep, onto which flights, in which cabin."""
    return {
        "action": d.action,
        "flights": [leg.flight_id for leg in d.new_legs],
        "cabin": sorted({leg.cabin for leg in d.new_legs}),
        "refund": d.cost.refund,
    }


class BookingChanged(msgspec.Struct, kw_only=True):
    """A decision was applied to the booking store (``keep`` included: nothing moved).

    Sent inside ``BookingsChanged``: every change of the booking store goes through that one
    stream, so a booking's changes are replayed in the order they were made.
    """

    decision_id: str
    disruption_id: str
    booking_id: str
    flight_id: str
    action: RebookAction
    passengers: list[Passenger]
    old_legs: list[Leg]
    new_legs: list[Leg]
    cost: Cost = Cost()
    hotel: bool = False
    rationale: str = ""
    version: int = 0


@event("travel.booking.changes", durable=True)
class BookingsChanged(msgspec.Struct, kw_only=True):
    """What the rebooker changed for one ``RebookGroup`` (or one ``RebookPassenger``): one
    ``BookingChanged`` per booking applied, in the order of the decisions."""

    group_id: str  # the decision's id for a single RebookPassenger
    changes: list[BookingChanged]


@event("travel.booking.rejected", key="booking_id", durable=True)
class RebookRejected(msgspec.Struct, kw_only=True):
    """A decision could not be applied (a seat was taken meanwhile, or the booking moved on)."""

    decision_id: str
    disruption: Disruption
    booking_id: str
    reason: Literal["seat_taken", "stale", "unknown_booking", "invalid"]
    passenger_ids: list[str]
    detail: str = ""
    taken_seats: list[str] = []  # "<flight_id>/<seat>"
    current: Booking | None = None  # the booking as the store has it now
    attempt: int = 1


@event("travel.passenger.notified", key="passenger_id")
class PassengerNotified(msgspec.Struct, kw_only=True):
    """A passenger was told what happened and what their itinerary is now."""

    disruption_id: str
    decision_id: str
    booking_id: str
    passenger_id: str
    action: RebookAction
    channel: str
    text: str


# The passenger conversation (the concierge)


@event("travel.passenger.asked", key="conversation_id", durable=True)
class PassengerAsked(msgspec.Struct, kw_only=True):
    """A traveller's message in a conversation with the assistant."""

    question_id: str  # unique per message (the gateway makes it: uuid4 hex)
    conversation_id: str  # a passenger's chat: "chat-<passenger_id>" by default
    passenger_id: str
    text: str
    channel: str = "chat"


@event("travel.passenger.answered", key="conversation_id")
class PassengerAnswered(msgspec.Struct, kw_only=True):
    """The assistant's answer to one PassengerAsked."""

    question_id: str
    conversation_id: str
    passenger_id: str
    text: str
    facts: list[str] = []  # the facts the answer used, one line each ("BA117 LHR->JFK delayed 3h10, now departs 14:40")
    action: str = ""  # what it did: "" (nothing), "rebook", "refund", "refused"
    outcome: str = ""  # e.g. "rebooked on BA118, seat 14C" once BookingsChanged/RebookRejected arrived


# Context queries (answered by the context agent)


class BookingsOnFlightReply(msgspec.Struct, kw_only=True):
    flight_id: str
    flight: Flight | None
    bookings: list[Booking]
    mct_minutes: dict[str, int] = {}  # minimum connection time of every airport the bookings touch


@query("travel.context.bookings-on-flight", reply=BookingsOnFlightReply, key="flight_id")
class BookingsOnFlight(msgspec.Struct, kw_only=True):
    """The active bookings with a leg on ``flight_id``, as the context view knows them now."""

    flight_id: str


class OnwardConnection(msgspec.Struct, frozen=True, kw_only=True):
    flight_id: str
    departure: int  # estimated departure as currently known
    passengers: int


class OnwardConnectionsReply(msgspec.Struct, kw_only=True):
    flight_id: str
    mct_minutes: int  # minimum connection time at the arrival airport
    connections: list[OnwardConnection]


@query("travel.context.onward-connections", reply=OnwardConnectionsReply, key="flight_id")
class OnwardConnections(msgspec.Struct, kw_only=True):
    """The onward flights that passengers of ``flight_id`` connect to."""

    flight_id: str


class AlternativeItinerary(msgspec.Struct, kw_only=True):
    """One way to get there: one or two flights, with the seats still free on each."""

    flights: list[Flight]
    free_seats: list[list[Seat]]  # per flight, every cabin
    arrival: int  # estimated arrival at the destination


class AlternativesReply(msgspec.Struct, kw_only=True):
    itineraries: list[AlternativeItinerary]


@query("travel.context.alternatives", reply=AlternativesReply)
class Alternatives(msgspec.Struct, kw_only=True):
    """Itineraries from ``origin`` to ``destination`` departing at or after ``not_before``, earliest arrival first."""

    origin: str
    destination: str
    not_before: int
    exclude: list[str] = []  # flight ids not to use (the disrupted ones)
    min_free: int = 1  # at least this many free seats in ``cabin`` on every flight
    cabin: str | None = None
    limit: int = 8


class ItineraryRef(msgspec.Struct, kw_only=True):
    """One itinerary of an ``AlternativesManyReply``: its flights by id (the reply carries each flight,
    and its free seats, once)."""

    flights: list[str]
    arrival: int  # estimated arrival at the destination


class AlternativesManyReply(msgspec.Struct, kw_only=True):
    #: per search, in the order of the query's, earliest arrival first; for the first searches only when
    #: answering them all would make the reply too large (about 512 KiB): ask the others again
    results: list[list[ItineraryRef]]
    flights: dict[str, Flight] = {}  # every flight the itineraries name, with its times as now estimated
    free_seats: dict[str, list[Seat]] = {}  # per flight of ``flights``, every cabin


@query("travel.context.alternatives-many", reply=AlternativesManyReply)
class AlternativesMany(msgspec.Struct, kw_only=True):
    """Several ``Alternatives`` searches answered together, from one state of the view: the itineraries
    of searches from nearby places share flights, and each flight's seats are sent once."""

    searches: Annotated[list[Alternatives], msgspec.Meta(min_length=1, max_length=MAX_SEARCHES)]


class PassengerBookingsReply(msgspec.Struct, kw_only=True):
    passenger_id: str
    passenger: Passenger | None  # None: no booking of the day names this passenger
    bookings: list[Booking]  # every booking of the passenger (refunded ones too), as the view knows them now
    cities: dict[str, str] = {}  # airport code -> city, for every airport of the day
    #: the changes the booking store made to these bookings today, in the order it made them (each one
    #: the notifier told the booking's passengers of)
    changes: list[BookingChanged] = []


@query("travel.context.passenger-bookings", reply=PassengerBookingsReply, key="passenger_id")
class PassengerBookings(msgspec.Struct, kw_only=True):
    """The bookings of one passenger, with their current legs and seats."""

    passenger_id: str


class FlightInfoReply(msgspec.Struct, kw_only=True):
    flight_id: str
    flight: Flight | None  # the schedule (None: unknown flight)
    status: str = "scheduled"  # the last status the feed reported (FlightStatus), "scheduled" before any
    estimated_departure: int | None = None
    estimated_arrival: int | None = None
    delay_minutes: int = 0  # estimated departure after the scheduled one
    gate: str | None = None
    reason: str = ""


@query("travel.context.flight-info", reply=FlightInfoReply, key="flight_id")
class FlightInfo(msgspec.Struct, kw_only=True):
    """A flight's schedule and its live status, with the estimated times the feed reported."""

    flight_id: str


class FareRulesReply(msgspec.Struct, kw_only=True):
    booking_id: str
    fare: Fare | None  # None: unknown booking
    rules: list[str] = []  # the fare's change and refund rules, one sentence each


@query("travel.context.fare-rules", reply=FareRulesReply, key="booking_id")
class FareRules(msgspec.Struct, kw_only=True):
    """The fare of a booking and its change and refund rules."""

    booking_id: str


class PassengerPreferencesReply(msgspec.Struct, kw_only=True):
    passenger_id: str
    name: str = ""
    tier: str = "none"  # loyalty tier
    seat_preference: str = "any"  # window, aisle or any
    known: bool = False  # False: no booking of the day names this passenger


@query("travel.context.passenger-preferences", reply=PassengerPreferencesReply, key="passenger_id")
class PassengerPreferences(msgspec.Struct, kw_only=True):
    """A passenger's loyalty tier and seating preference."""

    passenger_id: str
