"""Health gates: is it safe to take the next step? Every signal that says no is a reason.

A gate reads CloudWatch alarms (the migration's composite alarm and the alarms the file
names) and, while replication carries the data, the engine's own status (lag against the
file's limits, slot lost, engine problems). A signal that cannot be read counts as
unhealthy: a gate that fails open would wave a broken migration through.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lambdas.core.config import LagLimits
from lambdas.core.engines.base import Phase, ReplicationStatus


class AlarmReader(Protocol):
    def describe_alarms(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class HealthVerdict:
    healthy: bool
    reasons: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


class HealthSignal(ABC):
    name: str

    @abstractmethod
    def problems(self) -> list[str]:
        """What is wrong now; empty when healthy."""


class AlarmSignal(HealthSignal):
    """Named CloudWatch alarms (metric or composite): any in ALARM, or missing, is a problem."""

    name = "alarms"

    def __init__(self, cloudwatch: AlarmReader, alarm_names: Sequence[str]) -> None:
        self._cloudwatch = cloudwatch
        self._names = sorted(set(alarm_names))

    def problems(self) -> list[str]:
        if not self._names:
            return []
        found: dict[str, str] = {}
        for start in range(0, len(self._names), 100):  # DescribeAlarms takes at most 100 names
            page = self._cloudwatch.describe_alarms(
                AlarmNames=self._names[start : start + 100], AlarmTypes=["CompositeAlarm", "MetricAlarm"]
            )
            for alarm in [*page.get("MetricAlarms", []), *page.get("CompositeAlarms", [])]:
                found[alarm["AlarmName"]] = alarm["StateValue"]
        problems = [f"alarm {n} is in ALARM" for n in self._names if found.get(n) == "ALARM"]
        problems += [
            f"alarm {n} does not exist (create it or remove it from alarms.names)"
            for n in self._names
            if n not in found
        ]
        return problems


class ReplicationSignal(HealthSignal):
    """The engine's status against the file's lag limits."""

    name = "replication"

    def __init__(self, status: ReplicationStatus, limits: LagLimits) -> None:
        self._status = status
        self._limits = limits

    def problems(self) -> list[str]:
        status, limits = self._status, self._limits
        problems = list(status.problems)
        if status.phase is Phase.FAILED:
            problems.append(f"the {status.engine} engine reports phase 'failed'")
        if status.dead_letters:
            problems.append(
                f"{status.dead_letters} change event(s) could not be applied and are in the dead-letter queue"
            )
        if status.slot is not None and status.slot.lost:
            problems.append(f"replication slot {status.slot.name} lost its WAL")
        if status.lag_seconds is None:
            problems.append("replication lag in seconds is unknown (subscriber not connected?)")
        elif status.lag_seconds > limits.max_seconds:
            problems.append(f"replication lag {status.lag_seconds:.1f}s is over lag.max_seconds={limits.max_seconds:g}")
        if status.lag_bytes is not None and status.lag_bytes > limits.max_bytes:
            problems.append(f"replication lag {status.lag_bytes} bytes is over lag.max_bytes={limits.max_bytes}")
        return problems


def evaluate_health(signals: Sequence[HealthSignal]) -> HealthVerdict:
    reasons: list[str] = []
    for signal in signals:
        try:
            reasons += signal.problems()
        except Exception as exc:  # unreadable counts as unhealthy, never as healthy
            reasons.append(f"{signal.name}: could not be read ({type(exc).__name__}: {exc})")
    return HealthVerdict(healthy=not reasons, reasons=reasons, checked=[s.name for s in signals])
