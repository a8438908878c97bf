"""Sequence sync task: move the target's sequences to the source's position plus the margin."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.catalog import list_tables
from lambdas.core.sequences import sync_sequences
from lambdas.core.tables import select_tables
from lambdas.handlers.runtime import MigrationEvent, both_databases, logger, metrics, tracer


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    migration = MigrationEvent.model_validate(event).parsed()
    with both_databases(migration, "zdm-sequences") as (source, target):
        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
        synced = sync_sequences(source, target, tables, margin=migration.cutover.sequence_margin)
    logger.info("sequences synced", extra={"count": len(synced), "changed": sum(s.changed for s in synced)})
    return {"sequences": [{**asdict(s), "sequence": str(s.sequence)} for s in synced]}
