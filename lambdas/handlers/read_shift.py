"""Read shift task: send `percent` of reads to the target (one step of read_shift.steps)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Field

from lambdas.handlers.cutover import build_router
from lambdas.handlers.runtime import MigrationEvent, logger, metrics, tracer


class ReadShiftRequest(MigrationEvent):
    percent: int = Field(ge=0, le=100, description="share of reads on the target after this step")


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ReadShiftRequest.model_validate(event)
    router = build_router(request.parsed())
    router.set_read_weight(request.percent)
    state = router.state()
    metrics.add_metric(name="ReadsOnTargetPercent", unit=MetricUnit.Percent, value=request.percent)
    logger.info("reads shifted", extra={"percent": request.percent, "router": router.name})
    return {"percent": request.percent, "router": router.name, "state": asdict(state)}
