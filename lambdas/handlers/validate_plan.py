"""Validation plan task: every selected table cut into chunks, the items of the Map state."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core import telemetry
from lambdas.core.catalog import list_tables
from lambdas.core.config import Migration
from lambdas.core.tables import TableName, select_tables
from lambdas.core.validation import Replication, SessionPair, plan_validation, replication_of
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer, validation_store


class PlanRequest(MigrationEvent):
    tables: list[str] | None = None  # 'schema.table' names instead of the migration's selection
    run: str | None = None  # the execution's name: the chunks are stored for the Distributed Map


def change_stream_replication(migration: Migration) -> Replication:
    """The debezium engine's stream: chunks re-check after the applier caught up (validate_chunk waits)."""
    settings = migration.validation
    return Replication(
        subscription=f"change stream {migration.topic_prefix}",
        timeout_seconds=settings.recheck_timeout_seconds,
        attempts=settings.recheck_attempts,
    )


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = PlanRequest.model_validate(event)
    migration = request.parsed()
    settings = migration.validation
    with SessionPair.open(*dsns(migration)) as pair:
        if request.tables:
            tables = [TableName.parse(t) for t in request.tables]
        else:
            tables = select_tables(list_tables(pair.source), migration.tables.include, migration.tables.exclude)
        # While the logical engine's subscription runs, differences are re-checked once the target caught up.
        replication = (
            replication_of(pair.target, migration.slot_name, slot=migration.slot_name, settings=settings)
            if migration.engine.type == "logical"
            else change_stream_replication(migration)
            if migration.engine.type == "debezium"
            else None
        )
        plan = plan_validation(pair, tables, settings, replication=replication)
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=migration.name)
    metrics.add_metric(name=telemetry.VALIDATION_CHUNKS_TOTAL, unit=MetricUnit.Count, value=len(plan.chunks))
    logger.info(
        "validation planned",
        extra={
            "tables": len(plan.tables),
            "chunks": len(plan.chunks),
            "stored": request.run is not None,
            "live_replication": replication is not None,
            "row_hash": plan.tables[0].row_hash if plan.tables else None,
        },
    )
    if request.run is not None:
        plan = validation_store().store_chunks(plan, request.run)
    return plan.model_dump(mode="json")
