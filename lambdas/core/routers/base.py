"""The traffic router interface: read weights, holding clients, the writer switch.

Each backend (pgbouncer, Route53 weighted records, RDS Proxy) is one subclass in its own
module. Reads may move in steps; the writer moves at once (two writable primaries at once
is split brain). Every operation is idempotent: calling it again leaves the same state.

Holding clients is what makes a write fence invisible to applications: a router that can
hold (pgbouncer's PAUSE) queues new transactions until `release()`, so clients see a pause
instead of an error. Routers that cannot hold (DNS, RDS Proxy) return a handle that is
already done with `holding = False`; then the database-side fence alone refuses writes and
clients see read-only errors for the length of the fence.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum


class Side(StrEnum):
    SOURCE = "source"
    TARGET = "target"

    @property
    def other(self) -> Side:
        return Side.TARGET if self is Side.SOURCE else Side.SOURCE


class RouterError(RuntimeError):
    """A router operation that cannot be done as asked; the message says what to change."""


@dataclass(frozen=True)
class RouterState:
    writer: Side | None  # None: the writer points at neither database (or cannot be told)
    read_weight: int | None  # percent of reads on the target; None when unknown
    holding: bool  # clients are being held (pgbouncer paused)


class HoldHandle(ABC):
    """A hold in progress. `done()` polls without blocking; `cancel()` lets clients go again."""

    holding: bool  # False for routers that cannot hold clients at all

    @abstractmethod
    def done(self) -> bool:
        """True once every client is held (no transaction runs through the router)."""

    @abstractmethod
    def cancel(self) -> None:
        """Give up the hold: clients continue where they were routed before."""

    def describe(self) -> str:
        """What the hold still waits for (for timeout messages)."""
        return "nothing" if self.done() else "clients to finish their transactions"


class NoHold(HoldHandle):
    """The handle of a router that cannot hold clients: done at once, nothing to cancel."""

    holding = False

    def done(self) -> bool:
        return True

    def cancel(self) -> None:
        return None


class TrafficRouter(ABC):
    name: str

    @abstractmethod
    def set_read_weight(self, target_percent: int) -> None:
        """Send `target_percent` (0-100) of reads to the target and the rest to the source."""

    @abstractmethod
    def begin_hold(self) -> HoldHandle:
        """Start holding clients (fence writes at the router); returns without waiting."""

    @abstractmethod
    def switch_writer(self, side: Side) -> None:
        """Point the writer at `side`, all at once. Idempotent."""

    @abstractmethod
    def release(self) -> None:
        """Let held clients continue (unfence), to wherever the writer points now. Idempotent."""

    @abstractmethod
    def state(self) -> RouterState:
        """Where the writer and reads point now, and whether clients are held; changes nothing."""

    @property
    def stale_seconds(self) -> float:
        """How long after a change clients may still reach where traffic went before (a DNS TTL)."""
        return 0.0

    @property
    def holds_clients(self) -> bool:
        """Whether `begin_hold` can hold clients (else clients see the database fence's errors)."""
        return False


def check_weight(target_percent: int) -> int:
    if isinstance(target_percent, bool) or not isinstance(target_percent, int) or not 0 <= target_percent <= 100:
        raise RouterError(f"a read weight is a whole percentage from 0 to 100; got {target_percent!r}")
    return target_percent
