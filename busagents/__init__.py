"""busagents: event-driven AI agents that talk only through NATS with typed contracts."""

from .agent import Agent, on
from .bus import Bus, Received
from .context import Context
from .contract import Durability, Kind, command, contract_info, event, json_schema, query, upcaster
from .envelope import Envelope
from .errors import (
    BusagentsError,
    ConfigError,
    ContractError,
    DecodeError,
    NatsUnavailableError,
    NoResponderError,
    PermanentError,
    QueryFailedError,
    UndeclaredContractError,
)
from .server import NatsServer
from .state import State, StateConflictError, StateEntry
from .worker import Worker

__all__ = [
    "Agent",
    "Bus",
    "BusagentsError",
    "ConfigError",
    "Context",
    "ContractError",
    "DecodeError",
    "Durability",
    "Envelope",
    "Kind",
    "NatsServer",
    "NatsUnavailableError",
    "NoResponderError",
    "PermanentError",
    "QueryFailedError",
    "Received",
    "State",
    "StateConflictError",
    "StateEntry",
    "UndeclaredContractError",
    "Worker",
    "command",
    "contract_info",
    "event",
    "json_schema",
    "on",
    "query",
    "upcaster",
]

__version__ = "0.1.0"
