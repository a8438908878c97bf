"""Materialized view task: refresh the selected views on the target before reads move there (neither the
copy nor replication fills them)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.matviews import refresh_materialized_views
from lambdas.handlers.runtime import MigrationEvent, both_databases, logger, metrics, tracer


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    migration = MigrationEvent.model_validate(event).parsed()
    with both_databases(migration, "zdm-refresh-views") as (source, target):
        views = refresh_materialized_views(source, target, migration.tables.include, migration.tables.exclude)
    refreshed = [v for v in views if v.refreshed]
    metrics.add_metric(name="MaterializedViewsRefreshed", unit=MetricUnit.Count, value=len(refreshed))
    logger.info(
        "materialized views refreshed",
        extra={"refreshed": len(refreshed), "left_unpopulated": len(views) - len(refreshed)},
    )
    return {"views": [{"view": str(v.name), "refreshed": v.refreshed, "seconds": round(v.seconds, 3)} for v in views]}
