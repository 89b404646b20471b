"""The busagents flight assistant: monitor, context, reasoner, rebooker and notifier agents.

Each agent is a plugin (entry-point group ``busagents.agents``); ``busagents demo``
runs them all on an embedded nats-server (``busagents_flight.demo``).
"""

from .context import ContextAgent
from .monitor import FlightMonitor
from .notifier import Channel, Notifier, OutboxChannel
from .policy import OfflinePolicy
from .reasoner import ReasonerAgent
from .reasoning import AffectedBooking, Case, Reasoner, load_reasoner
from .rebooker import Rebooker
from .store import BookingStore, SqliteStore, open_store

__all__ = [
    "AffectedBooking",
    "BookingStore",
    "Case",
    "Channel",
    "ContextAgent",
    "FlightMonitor",
    "Notifier",
    "OfflinePolicy",
    "OutboxChannel",
    "Reasoner",
    "ReasonerAgent",
    "Rebooker",
    "SqliteStore",
    "load_reasoner",
    "open_store",
]
