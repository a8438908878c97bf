"""Replication task: start, status, stop or teardown of the migration's engine."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.catalog import list_tables
from lambdas.core.config import Migration
from lambdas.core.db import connect
from lambdas.core.engines.base import ReplicationEngine
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.tables import select_tables
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer


class ReplicationRequest(MigrationEvent):
    action: Literal["start", "status", "stop", "teardown"]


def build_engine(migration: Migration, source_dsn: str, target_dsn: str) -> ReplicationEngine:
    if migration.engine.type != "logical":
        raise ValueError(f"engine {migration.engine.type!r} is not available in this build; use engine.type: logical")
    source = connect(source_dsn)
    try:
        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
    finally:
        source.close()
    plan = LogicalReplicationPlan(ReplicationNames(migration.slot_name), tuple(tables), migration.engine.logical)
    return LogicalEngine(source_dsn, target_dsn, plan)


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ReplicationRequest.model_validate(event)
    migration = request.parsed()
    engine = build_engine(migration, *dsns(migration))
    if request.action == "start":
        return asdict(engine.start())
    if request.action == "stop":
        engine.stop()
        return {"stopped": True}
    if request.action == "teardown":
        return asdict(engine.teardown())
    status = engine.status()
    if status.lag_seconds is not None:
        metrics.add_metric(name="ReplicationLagSeconds", unit=MetricUnit.Seconds, value=status.lag_seconds)
    if status.lag_bytes is not None:
        metrics.add_metric(name="ReplicationLagBytes", unit=MetricUnit.Bytes, value=status.lag_bytes)
    if status.slot and status.slot.retained_wal_bytes is not None:
        metrics.add_metric(name="SlotRetainedWalBytes", unit=MetricUnit.Bytes, value=status.slot.retained_wal_bytes)
    return status.to_json()
