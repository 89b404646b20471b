"""Configuration of the flight assistant: ``BUSAGENTS_FLIGHT_*`` environment variables and CLI flags.

In a dry run (``BUSAGENTS_DRY_RUN=1``: ``busagents run NAME --dry-run`` or ``--shadow``) the
store and the outbox are scratch copies of the live ones, in a temporary directory.

Agents started on their own (``busagents run flight-context``) read the same
settings as the demo, so every process generates the same seeded day. A relative store or
outbox path is taken in ``BUSAGENTS_DATA_DIR`` when it is set (``busagents swarm up`` sets it
to the swarm's data directory), else in the current directory.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from busagents import ConfigError
from busagents.settings import Settings

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
    #: LLM reasoner: decide the bookings of one disruption in groups, one model call each (else
    #: one conversation per booking), and send to the model only the bookings that need judgement
    #: (notes, special service requests, tier/family cases, re-decisions), the policy decides the rest.
    llm_groups: bool = True
    llm_triage: bool = True
    #: Booking store: SQLite file path, or a PostgreSQL DSN (``postgresql://...``).
    store: str = "bookings.sqlite3"
    #: Notification outbox file (JSON lines).
    outbox: str = "outbox.jsonl"

    @model_validator(mode="after")
    def _in_data_dir(self) -> FlightSettings:
        """Relative file paths in the data directory, when there is one; scratch copies in a dry run."""
        data = os.environ.get("BUSAGENTS_DATA_DIR")
        if data:
            if "://" not in self.store and not Path(self.store).is_absolute():
                self.store = str(Path(data) / self.store)
            if not Path(self.outbox).is_absolute():
                self.outbox = str(Path(data) / self.outbox)
        if Settings().dry_run:
            self.store, self.outbox = _scratch(self.store, self.outbox)
        return self


def _scratch(store: str, outbox: str) -> tuple[str, str]:
    """Copies of the booking store and the outbox for a dry run (``busagents run --dry-run/--shadow``):
    the rebooker and the notifier act on these, never on the live ones. Made once per process."""
    if "://" in store:
        raise ConfigError(
            f"a dry run needs a SQLite booking store to copy, not {store.split('://')[0]}://...; "
            "set BUSAGENTS_FLIGHT_STORE to a file"
        )
    scratch = Path(tempfile.gettempdir()) / f"busagents-dry-run-{os.getpid()}"
    copy_store, copy_outbox = scratch / Path(store).name, scratch / Path(outbox).name
    if not scratch.exists():
        scratch.mkdir(parents=True)
        if Path(store).exists():  # a consistent copy, even while the live rebooker writes
            with closing(sqlite3.connect(store)) as live, closing(sqlite3.connect(copy_store)) as copy:
                live.backup(copy)
        if Path(outbox).exists():  # the notices already sent: the scratch notifier does not send them again
            shutil.copyfile(outbox, copy_outbox)
    return str(copy_store), str(copy_outbox)
