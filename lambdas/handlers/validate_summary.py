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
    store = validation_store() if plan.items is not None else None
    if store is not None and plan.items is not None and plan.items.plan is not None:
        plan = store.load_plan(plan.items)
    results = store.iter_results(plan.items) if store is not None and plan.items is not None else request.results
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
    if store is not None and plan.items is not None:
        # The per-table part grows with the tables and their first differing keys: stored whole; the
        # task returns the totals (its result counts against the state's 256 KiB before any ResultSelector).
        key = store.store_summary(plan.items, summary.model_dump_json().encode())
        return {**summary.model_dump(mode="json", exclude={"per_table"}), "stored": key}
    return summary.model_dump(mode="json")
