"""Health gate task: the migration's alarms (and, while replicating, the engine's lag) say go or roll back."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.health import AlarmSignal, HealthSignal, ReplicationSignal, evaluate_health
from lambdas.core.telemetry import composite_alarm_name
from lambdas.handlers.replication import engine_for
from lambdas.handlers.runtime import MigrationEvent, logger, metrics, tracer


class GateRequest(MigrationEvent):
    phase: str = "gate"  # where the gate stands (read shift 10%, post-cutover, ...): for the logs
    check_replication: bool = True  # forward replication still carries the data


@cache
def _cloudwatch() -> Any:
    import boto3

    return boto3.client("cloudwatch")


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = GateRequest.model_validate(event)
    migration = request.parsed()
    signals: list[HealthSignal] = [
        AlarmSignal(_cloudwatch(), [composite_alarm_name(migration.name), *migration.alarms.names])
    ]
    if request.check_replication:
        status = engine_for(migration).status()
        signals.append(ReplicationSignal(status, migration.lag))
    verdict = evaluate_health(signals)
    logger.info("health gate", extra={"phase": request.phase, "healthy": verdict.healthy, "reasons": verdict.reasons})
    return {"phase": request.phase, **asdict(verdict)}
