"""Preflight task: every check, pass/fail/warn with its measured value and remedy."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.db import connect
from lambdas.core.preflight import run_preflight
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = MigrationEvent.model_validate(event)
    migration = request.parsed()
    source_dsn, target_dsn = dsns(migration)
    source, target = connect(source_dsn), connect(target_dsn)
    try:
        report = run_preflight(source, target, migration)
    finally:
        source.close()
        target.close()
    failed = [c.name for c in report.checks if c.status == "fail"]
    metrics.add_metric(name="PreflightFailedChecks", unit=MetricUnit.Count, value=len(failed))
    logger.info("preflight finished", extra={"ok": report.ok, "failed": failed})
    return {"ok": report.ok, "failed": failed, "checks": [asdict(c) for c in report.checks]}
