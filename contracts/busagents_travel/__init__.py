"""Typed travel contracts of the busagents flight assistant.

Events are facts (``FlightDelayed``), commands ask one agent to act
(``RebookPassenger``), queries are answered by the context agent
(``BookingsOnFlight``). Keyed contracts carry their key as the last subject token,
e.g. ``travel.flight.delayed.BA117-0600``.
"""

from .messages import (
    AlternativeItinerary,
    Alternatives,
    AlternativesReply,
    BookingChanged,
    BookingsChanged,
    BookingsOnFlight,
    BookingsOnFlightReply,
    Cost,
    Disruption,
    DisruptionAssessed,
    FlightCancelled,
    FlightDelayed,
    FlightStatusUpdated,
    OnwardConnection,
    OnwardConnections,
    OnwardConnectionsReply,
    PassengerAnswered,
    PassengerAsked,
    PassengerNotified,
    RebookGroup,
    RebookPassenger,
    RebookRejected,
)
from .model import Airport, Booking, Fare, Flight, Leg, Passenger, Seat

__all__ = [
    "Airport",
    "AlternativeItinerary",
    "Alternatives",
    "AlternativesReply",
    "Booking",
    "BookingChanged",
    "BookingsChanged",
    "BookingsOnFlight",
    "BookingsOnFlightReply",
    "Cost",
    "Disruption",
    "DisruptionAssessed",
    "Fare",
    "Flight",
    "FlightCancelled",
    "FlightDelayed",
    "FlightStatusUpdated",
    "Leg",
    "OnwardConnection",
    "OnwardConnections",
    "OnwardConnectionsReply",
    "Passenger",
    "PassengerAnswered",
    "PassengerAsked",
    "PassengerNotified",
    "RebookGroup",
    "RebookPassenger",
    "RebookRejected",
    "Seat",
]
