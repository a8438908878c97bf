"""The replication engine interface: start, status, stop, teardown.

Each backend (native logical replication, AWS DMS, Debezium) is one subclass in its own
module. Every operation is idempotent: Step Functions retries tasks and Lambdas are
re-invoked, so calling any of them again must leave the same, correct state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    NOT_STARTED = "not_started"
    COPYING = "copying"  # initial copy running
    STREAMING = "streaming"  # copy done, changes flowing
    STOPPED = "stopped"  # set up, but not applying changes
    FAILED = "failed"


class TableSyncState(StrEnum):
    PENDING = "pending"
    COPYING = "copying"
    COPIED = "copied"  # data copied, catching up with the stream
    READY = "ready"  # following the stream


@dataclass(frozen=True)
class TableStatus:
    table: str
    state: TableSyncState
    rows_copied: int | None = None
    chunks_total: int | None = None
    chunks_done: int | None = None


@dataclass(frozen=True)
class SlotHealth:
    name: str
    exists: bool
    active: bool = False
    wal_status: str | None = None  # reserved / extended / unreserved / lost
    retained_wal_bytes: int | None = None
    safe_wal_bytes: int | None = None  # how much more WAL before max_slot_wal_keep_size loses it

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


@dataclass(frozen=True)
class ReplicationStatus:
    engine: str
    phase: Phase
    tables: list[TableStatus] = field(default_factory=list)
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    source_lsn: str | None = None
    applied_lsn: str | None = None
    slot: SlotHealth | None = None
    problems: list[str] = field(default_factory=list)
    dead_letters: int | None = None  # change events the engine could not apply (debezium)
    pending_events: int | None = None  # published, not yet applied (debezium)
    # Tables created on the source after the start, already on the target: the engine can add them now (logical)
    tables_to_add: list[str] = field(default_factory=list)

    @property
    def copy_done(self) -> bool:
        return self.phase in (Phase.STREAMING, Phase.STOPPED) and all(
            t.state is TableSyncState.READY for t in self.tables
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StartResult:
    engine: str
    already_running: bool
    tables: list[str]
    rows_copied: int = 0
    copy_seconds: float = 0.0
    consistent_lsn: str | None = None


@dataclass(frozen=True)
class TeardownResult:
    removed: list[str]


@dataclass(frozen=True)
class FenceReached:
    """A change stream (not a subscription) has applied on the target everything committed before the fence."""

    marker_lsn: str  # where the marker written after the fence is in the source's WAL
    waited_seconds: float
    events_applied_to: dict[str, int]  # the stream's own positions reached (debezium: topic/partition offsets)
    marker_seen_seconds: float = 0.0  # of waited_seconds, until the marker was seen (on the broker, on the target)


class ReplicationEngine(ABC):
    name: str

    @abstractmethod
    def start(self) -> StartResult:
        """Begin replicating the selected tables (initial copy, then changes); resumes when already started."""

    @abstractmethod
    def status(self) -> ReplicationStatus:
        """Per-table state, lag in bytes and seconds, slot health; never changes anything."""

    @abstractmethod
    def stop(self) -> None:
        """Stop applying changes, keeping everything needed to resume."""

    @abstractmethod
    def teardown(self) -> TeardownResult:
        """Remove everything the engine created (safe after a half-finished start)."""
