"""Preflight task: every check, pass/fail/warn with its measured value and remedy."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.db import connect
from lambdas.core.endpoints import with_login_of
from lambdas.core.preflight import PreflightReport, run_preflight
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = MigrationEvent.model_validate(event)
    migration = request.parsed()
    source_dsn, target_dsn = dsns(migration)
    source, target = connect(source_dsn), connect(target_dsn)
    # rds-proxy: the application's proxy keeps the source's secret when it is pointed at the target
    proxy_login = with_login_of(target_dsn, source_dsn) if migration.router.type == "rds-proxy" else None
    try:
        report = run_preflight(source, target, migration, proxy_login_dsn=proxy_login)
    finally:
        source.close()
        target.close()
    failed = [c.name for c in report.checks if c.status == "fail"]
    metrics.add_metric(name="PreflightFailedChecks", unit=MetricUnit.Count, value=len(failed))
    # The log keeps every finding; the state gets at most DETAILS_SHOWN per check (its 256 KiB limit).
    logger.info(
        "preflight finished",
        extra={"ok": report.ok, "failed": failed, "details": {c.name: c.details for c in report.checks if c.details}},
    )
    return report_for_state(report)


DETAILS_SHOWN = 50


def report_for_state(report: PreflightReport) -> dict[str, Any]:
    """The report as the task returns it: a state holds 256 KiB, and a schema of thousands of tables failing
    one check would pass it (States.DataLimitExceeded, which no Catch catches)."""
    checks = []
    for check in report.checks:
        out = asdict(check)
        if len(check.details) > DETAILS_SHOWN:
            left = len(check.details) - DETAILS_SHOWN
            out["details"] = [*check.details[:DETAILS_SHOWN], f"... and {left} more (all in the function's log)"]
        checks.append(out)
    return {"ok": report.ok, "failed": [c.name for c in report.checks if c.status == "fail"], "checks": checks}
