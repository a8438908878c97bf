"""Read shift task: send `percent` of reads to the target (one step of read_shift.steps), in turn with
cutover and rollback, and never after a rollback that started since its execution did."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Field

from lambdas.core.cutover.readshift import shift_reads
from lambdas.core.db import connect
from lambdas.handlers.cutover import build_router
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer


class ReadShiftRequest(MigrationEvent):
    percent: int = Field(ge=0, le=100, description="share of reads on the target after this step")
    execution_started: datetime | None = Field(
        default=None, description="the execution's start ($$.Execution.StartTime): a later rollback wins"
    )


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ReadShiftRequest.model_validate(event)
    migration = request.parsed()
    router = build_router(migration)
    target = connect(dsns(migration)[1], application_name="zdm-read-shift")
    try:
        shift_reads(target, router, migration.name, request.percent, execution_started=request.execution_started)
    finally:
        target.close()
    state = router.state()
    metrics.add_metric(name="ReadsOnTargetPercent", unit=MetricUnit.Percent, value=request.percent)
    logger.info("reads shifted", extra={"percent": request.percent, "router": router.name})
    return {"percent": request.percent, "router": router.name, "state": asdict(state)}
