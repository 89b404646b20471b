"""Configuration of the flight assistant: ``BUSAGENTS_FLIGHT_*`` environment variables and CLI flags.

Agents started on their own (``busagents run flight-context``) read the same
settings as the demo, so every process generates the same seeded day.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FlightSettings"]


class FlightSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUSAGENTS_FLIGHT_", extra="ignore")

    #: The seeded airline day.
    flights: int = 40
    passengers: int = 3000
    seed: int = 7
    #: Real seconds the status feed takes to play the day (0: as fast as possible).
    day_seconds: float = 8.0
    #: Delay (minutes) from which every passenger of the flight may be rebooked.
    rebook_threshold_minutes: int = 180
    #: Reasoner backend by name (entry-point group ``busagents_flight.reasoners``).
    reasoner: str = "offline"
    #: Booking store: SQLite file path, or a PostgreSQL DSN (``postgresql://...``).
    store: str = "bookings.sqlite3"
    #: Notification outbox file (JSON lines).
    outbox: str = "outbox.jsonl"
