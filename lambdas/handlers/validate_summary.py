"""Validation summary task: every chunk's result merged per table and overall; `ok` gates the cutover."""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from lambdas.core.validation import ChunkResult, ValidationPlan, summarize
from lambdas.handlers.runtime import logger, tracer, validation_store


class SummaryRequest(BaseModel):
    """The plan (its chunk list may be left out) and the Map state's results; a stored plan's results
    are read from the store instead."""

    model_config = ConfigDict(extra="allow")
    plan: ValidationPlan
    results: list[ChunkResult] = Field(default_factory=list)


# No metric of its own: the chunk tasks already published the mismatched rows and chunks done.
@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = SummaryRequest.model_validate(event)
    plan = request.plan
    results = validation_store().iter_results(plan.items) if plan.items is not None else request.results
    summary = summarize(plan, results, finished_at=time.time())
    logger.info(
        "validation summarized",
        extra={
            "ok": summary.ok,
            "rows_compared": summary.rows_compared,
            "differences": summary.differences,
            "unsettled": summary.unsettled,
            "transient": summary.transient,
            "problems": summary.problems,
            "chunks_missing": summary.chunks_missing,
            "seconds": summary.seconds,
        },
    )
    return summary.model_dump(mode="json")
