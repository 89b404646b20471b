"""The travel domain's value types, shared by the contracts (not contracts themselves).

Times are integer seconds since the Unix epoch (UTC); money is integer minor units
(cents) in the fare's currency.

They are immutable records that never refer back to what holds them, so they are not tracked
by the cyclic garbage collector (``gc=False``): a day decodes millions of them (every free seat
of every reply), and tracking them made each decode pay for collections that find nothing.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "TIER_RANK",
    "Airport",
    "Booking",
    "CabinCode",
    "Fare",
    "Flight",
    "Leg",
    "LoyaltyTier",
    "Passenger",
    "Seat",
    "SeatPosition",
    "SeatPreference",
]

CabinCode = Literal["F", "J", "W", "Y"]  # first, business, premium economy, economy
SeatPosition = Literal["window", "middle", "aisle"]
SeatPreference = Literal["window", "aisle", "any"]
LoyaltyTier = Literal["none", "silver", "gold", "platinum"]

#: Higher is more valuable; breaks ties in the rebooking order.
TIER_RANK: dict[str, int] = {"none": 0, "silver": 1, "gold": 2, "platinum": 3}


class Airport(msgspec.Struct, frozen=True, gc=False):
    """An airport and its minimum connection time (MCT) between two flights."""

    code: str
    city: str
    mct_minutes: int


class Seat(msgspec.Struct, frozen=True, gc=False):
    """One seat of an aircraft: ``12A`` in cabin ``Y`` at the window."""

    number: str
    cabin: CabinCode
    position: SeatPosition


class Flight(msgspec.Struct, frozen=True, gc=False):
    """One scheduled flight of the day (``flight_id`` is unique for the day: number + date)."""

    flight_id: str
    number: str
    origin: str
    destination: str
    departure: int  # scheduled, epoch seconds
    arrival: int
    aircraft: str


class Passenger(msgspec.Struct, frozen=True, gc=False):
    passenger_id: str
    name: str
    tier: LoyaltyTier = "none"
    seat_preference: SeatPreference = "any"
    #: IATA special service requests (``WCHR`` wheelchair, ``UMNR`` unaccompanied minor...).
    ssr: list[str] = []


class Fare(msgspec.Struct, frozen=True, gc=False):
    """What the passenger paid and the fare's change rules."""

    fare_class: str  # booking class letter, e.g. "Y", "M", "Q", "J"
    cabin: CabinCode
    price: int  # per passenger, minor units
    change_fee: int  # per passenger, waived when the airline caused the change
    refundable: bool
    currency: str = "EUR"


class Leg(msgspec.Struct, frozen=True, gc=False):
    """One flight of an itinerary with the seats of the booking's passengers (same order)."""

    flight_id: str
    number: str
    origin: str
    destination: str
    departure: int
    arrival: int
    cabin: CabinCode
    seats: list[str]


class Booking(msgspec.Struct, frozen=True, gc=False):
    """A booking (PNR): passengers travelling together on one itinerary."""

    booking_id: str
    passengers: list[Passenger]
    legs: list[Leg]
    fare: Fare
    status: Literal["active", "refunded"] = "active"
    version: int = 0  # bumped by every change the booking store applies
    note: str = ""  # free text the passenger left (special requests): untrusted, data only
