"""Where the connector and the applier run: one abstract base, one module per backend.

On AWS the connector is an MSK Connect connector and the applier a Lambda fed by an MSK event
source mapping per table topic (lambdas/core/changestream/msk_runtime.py); in the rehearsal
both are local processes beside a local broker (rehearsal/changestream.py). Every method is
idempotent: the replication task calls them again on retries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class PartState(StrEnum):
    ABSENT = "absent"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    FAILED = "failed"


@dataclass(frozen=True)
class RuntimeHealth:
    connector: PartState
    applier: PartState
    problems: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.connector is PartState.RUNNING and self.applier is PartState.RUNNING


class ChangeStreamRuntime(ABC):
    @abstractmethod
    def start(self, connector: Mapping[str, str], topics: Sequence[str]) -> None:
        """Create (or resume) the connector with these settings and an applier consuming `topics`."""

    @abstractmethod
    def health(self) -> RuntimeHealth:
        """The connector's and the applier's state; never changes anything."""

    @abstractmethod
    def stop(self) -> None:
        """Pause the connector and the applier, keeping their offsets so that start resumes."""

    @abstractmethod
    def teardown(self) -> list[str]:
        """Remove the connector and the applier's subscriptions; what was removed."""
