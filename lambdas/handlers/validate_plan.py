"""Validation plan task: every selected table cut into chunks, the items of the Map state."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core import telemetry
from lambdas.core.catalog import list_tables
from lambdas.core.config import Migration
from lambdas.core.tables import TableName, select_tables
from lambdas.core.validation import Replication, SessionPair, ValidationPlan, plan_validation, replication_of
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer, validation_store


class PlanRequest(MigrationEvent):
    tables: list[str] | None = None  # 'schema.table' names instead of the migration's selection
    run: str | None = None  # the execution's name: the chunks are stored for the Distributed Map


# The re-check waits of one chunk must end within the ValidateChunk function's timeout (900 s,
# stacks/registry.py) with time left to compare: a timed-out chunk fails the Map and the migration.
CHUNK_WAIT_BUDGET_SECONDS = 780.0


def engine_replication(migration: Migration) -> Replication | None:
    """How chunks re-check a difference found while changes flow; None: nothing flows (no re-check).

    logical: wait for the subscription's position; debezium and dms: validate_chunk waits on the engine.
    """
    settings = migration.validation
    kind = migration.engine.type
    if kind == "debezium":
        name = f"change stream {migration.topic_prefix}"
    elif kind == "dms":
        name = "DMS task"  # waited on by its fence marker (DmsForwardStream.catch_up)
    else:
        return None
    timeout = settings.recheck_timeout_seconds
    return within_chunk_budget(
        Replication(subscription=name, timeout_seconds=timeout, attempts=settings.recheck_attempts)
    )


def within_chunk_budget(replication: Replication | None) -> Replication | None:
    """At most as many re-checks as fit CHUNK_WAIT_BUDGET_SECONDS (at least two), whatever the engine."""
    if replication is None:
        return None
    fit = int(CHUNK_WAIT_BUDGET_SECONDS // replication.timeout_seconds)
    return replication.model_copy(update={"attempts": max(2, min(replication.attempts, fit))})


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
            within_chunk_budget(
                replication_of(pair.target, migration.slot_name, slot=migration.slot_name, settings=settings)
            )
            if migration.engine.type == "logical"
            else engine_replication(migration)
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
    return for_state(plan)


def for_state(plan: ValidationPlan) -> dict[str, Any]:
    """What the task returns. A stored plan: its location only. A state carries at most 256 KiB
    (States.DataLimitExceeded, which no Catch on States.ALL catches: the execution fails without a
    rollback); the tables' specs grow with the schema (~1.6 KB for a table of 20 columns) and stay stored."""
    if plan.items is not None and plan.items.plan is not None:
        plan = plan.model_copy(update={"tables": [], "chunks_per_table": {}})
    return plan.model_dump(mode="json")
