"""Health gate task: the migration's alarms (and, while replicating, the engine's lag) say go or roll back.

In the rollback window the gate also reads the back replication (can a rollback still run?) and says
when to check next, or that the window is over (`lambdas.core.rollback_window`)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, Field

from lambdas.core import telemetry
from lambdas.core.config import Migration
from lambdas.core.cutover import RollbackReadiness
from lambdas.core.health import AlarmSignal, HealthSignal, ReplicationSignal, evaluate_health
from lambdas.core.rollback_window import WindowCheck, window_check
from lambdas.core.telemetry import composite_alarm_name
from lambdas.handlers.cutover import rollback_readiness
from lambdas.handlers.replication import engine_for
from lambdas.handlers.runtime import MigrationEvent, aws_client, logger, metrics, tracer


class WindowState(BaseModel):
    """The rollback window as the previous check left it (None at the first check)."""

    seconds: int = Field(ge=0)  # the window's length
    check_seconds: int = Field(default=30, ge=0)  # the file's poll: the least time between two checks
    started: datetime | None = None
    problems_since: datetime | None = None


class GateRequest(MigrationEvent):
    phase: str = "gate"  # where the gate stands (read shift 10%, post-cutover, ...): for the logs
    check_replication: bool = True  # forward replication still carries the data
    window: WindowState | None = None  # in the rollback window: also read the back replication


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = GateRequest.model_validate(event)
    migration = request.parsed()
    signals: list[HealthSignal] = [
        AlarmSignal(aws_client("cloudwatch"), [composite_alarm_name(migration.name), *migration.alarms.names])
    ]
    if request.check_replication:
        status = engine_for(migration).status()
        signals.append(ReplicationSignal(status, migration.lag))
    verdict = evaluate_health(signals)
    logger.info("health gate", extra={"phase": request.phase, "healthy": verdict.healthy, "reasons": verdict.reasons})
    result = {"phase": request.phase, **asdict(verdict)}
    if request.window is not None:
        readiness = rollback_readiness(migration)
        check = check_window(request.window, readiness, migration.lag.problems_max_seconds)
        publish_window_metrics(migration, readiness, check)
        if readiness.problems:
            logger.warning("a rollback would not run now", extra={"problems": readiness.problems})
        result.update(window_for_state(readiness, check))
    return result


def check_window(
    window: WindowState, readiness: RollbackReadiness, lasting_seconds: float, now: datetime | None = None
) -> WindowCheck:
    """What follows this check of the rollback window (`lambdas.core.rollback_window`)."""
    return window_check(
        now=now or datetime.now(UTC),
        started=_utc(window.started),
        window_seconds=window.seconds,
        poll_seconds=window.check_seconds,
        has_problems=bool(readiness.problems),
        problems_since=_utc(window.problems_since),
        lasting_seconds=lasting_seconds,
    )


def publish_window_metrics(migration: Migration, readiness: RollbackReadiness, check: WindowCheck) -> None:
    """RollbackReady: 0 once the back replication's problems have lasted lag.problems_max_seconds; and the
    WAL the back replication's slot holds on the target."""
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=migration.name)
    metrics.add_metric(name=telemetry.ROLLBACK_READY, unit=MetricUnit.Count, value=int(not check.problems_lasting))
    if readiness.retained_wal_bytes is not None:
        metrics.add_metric(
            name=telemetry.REVERSE_SLOT_RETAINED_WAL_BYTES, unit=MetricUnit.Bytes, value=readiness.retained_wal_bytes
        )


def window_for_state(readiness: RollbackReadiness, check: WindowCheck) -> dict[str, Any]:
    """The check as the state machine carries it to the next (ISO times, the next state's name)."""
    return {
        "rollback_ready": readiness.ready,
        "rollback_problems": readiness.problems,
        "window": {
            "started": check.started.isoformat(),
            "problems_since": check.problems_since.isoformat() if check.problems_since else None,
            "seconds_left": check.seconds_left,
            "next": check.next.value,
            "next_check_seconds": check.next_check_seconds,
        },
    }


def _utc(moment: datetime | None) -> datetime | None:
    return moment if moment is None or moment.tzinfo is not None else moment.replace(tzinfo=UTC)
