"""Replication task: start, status, stop or teardown of the migration's engine."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from functools import cache
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core import telemetry
from lambdas.core.catalog import list_tables
from lambdas.core.config import Migration
from lambdas.core.db import connect
from lambdas.core.engines.base import Phase, ReplicationEngine, ReplicationStatus, TableSyncState
from lambdas.core.engines.dms import DmsEngine, DmsTarget
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.tables import select_tables
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer

# Set by the CDK stack on the replication function: the DMS task or serverless replication to drive,
# and the CDC-only DMS task that writes the change stream to MSK (started with the migration).
DMS_TARGET_ENV = "ZDM_DMS_TARGET"
DMS_CHANGE_STREAM_ENV = "ZDM_DMS_CHANGE_STREAM"


class ReplicationRequest(MigrationEvent):
    action: Literal["start", "status", "stop", "teardown"]


def build_engine(migration: Migration, source_dsn: str, target_dsn: str) -> ReplicationEngine:
    """The logical engine over the migration's selected tables."""
    if migration.engine.type != "logical":
        raise ValueError(f"build_engine builds the logical engine; engine {migration.engine.type!r} is built elsewhere")
    source = connect(source_dsn)
    try:
        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
    finally:
        source.close()
    plan = LogicalReplicationPlan(ReplicationNames(migration.slot_name), tuple(tables), migration.engine.logical)
    return LogicalEngine(source_dsn, target_dsn, plan)


@cache
def _aws_client(service: str) -> Any:
    import boto3  # only on AWS paths

    return boto3.client(service)


def build_dms_engine(environ: Mapping[str, str] = os.environ, variable: str = DMS_TARGET_ENV) -> DmsEngine:
    """The DMS engine over the task the stack created (its ARN and metric dimensions in the environment)."""
    raw = environ.get(variable)
    if not raw:
        raise ValueError(f"engine 'dms' runs on AWS only: {variable} is not set (deploy the stack)")
    return DmsEngine(_aws_client("dms"), _aws_client("cloudwatch"), DmsTarget.from_json(raw))


def change_stream_engine(environ: Mapping[str, str] = os.environ) -> DmsEngine | None:
    """The CDC-only task feeding the change stream, when the file asks for one."""
    return build_dms_engine(environ, DMS_CHANGE_STREAM_ENV) if environ.get(DMS_CHANGE_STREAM_ENV) else None


def engine_for(migration: Migration) -> ReplicationEngine:
    if migration.engine.type == "dms":
        return build_dms_engine()
    return build_engine(migration, *dsns(migration))


def publish_status_metrics(migration: Migration, status: ReplicationStatus) -> None:
    """The metrics the monitoring construct alarms on (names in lambdas.core.telemetry)."""
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=migration.name)
    if status.lag_seconds is not None:
        metrics.add_metric(name=telemetry.REPLICATION_LAG_SECONDS, unit=MetricUnit.Seconds, value=status.lag_seconds)
    if status.lag_bytes is not None:
        metrics.add_metric(name=telemetry.REPLICATION_LAG_BYTES, unit=MetricUnit.Bytes, value=status.lag_bytes)
    if status.slot is not None:
        if status.slot.retained_wal_bytes is not None:
            metrics.add_metric(
                name=telemetry.SLOT_RETAINED_WAL_BYTES, unit=MetricUnit.Bytes, value=status.slot.retained_wal_bytes
            )
        slot_lost = status.slot.lost or (status.phase is not Phase.NOT_STARTED and not status.slot.exists)
        metrics.add_metric(name=telemetry.SLOT_LOST, unit=MetricUnit.Count, value=int(slot_lost))
    metrics.add_metric(
        name=telemetry.REPLICATION_FAILED, unit=MetricUnit.Count, value=int(status.phase is Phase.FAILED)
    )
    if status.tables:
        ready = sum(t.state is TableSyncState.READY for t in status.tables)
        metrics.add_metric(
            name=telemetry.TABLES_READY_PERCENT, unit=MetricUnit.Percent, value=100.0 * ready / len(status.tables)
        )


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ReplicationRequest.model_validate(event)
    migration = request.parsed()
    engine = engine_for(migration)
    stream = change_stream_engine()
    if request.action == "start":
        if stream is not None:  # changes flow to the stream from before the copy starts
            stream.start()
        return asdict(engine.start())
    if request.action == "stop":  # the change stream keeps running: its consumers are not rolled back
        engine.stop()
        return {"stopped": True}
    if request.action == "teardown":
        removed = engine.teardown().removed
        if stream is not None:
            removed += stream.teardown().removed
        return {"removed": removed}
    status = engine.status()
    publish_status_metrics(migration, status)
    return status.to_json()
