"""Validation chunk task (one Map item): compare one key range on both sides, name the differing rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel

from lambdas.core import telemetry
from lambdas.core.bulk_reads import tune_for_bulk_reads
from lambdas.core.validation import ChunkSpec, ChunkStep, SessionPair, StoredItems, compare_chunk
from lambdas.handlers.replication import build_debezium_engine, build_dms_stream
from lambdas.handlers.runtime import MigrationEvent, dsns, logger, metrics, tracer, validation_store

# Once per cold start: a chunk reads megabytes of records and builds many small objects.
tune_for_bulk_reads()


class ChunkRequest(MigrationEvent):
    chunk: ChunkSpec
    results: StoredItems | None = None  # a stored plan's: the result is stored, a receipt returned


class ChunkReceipt(BaseModel):
    """What a stored result leaves in the Map's output: small, so a million chunks fit the Map's results."""

    table: str
    chunk: int
    differences: int
    unsettled: int


class StepLog:
    """Logs what a running chunk is doing: each new step, and how far it is at most every `every`
    seconds (a table in no key order is one chunk that runs for minutes). Counts only, never keys."""

    def __init__(self, log: Callable[..., None], every: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self._log = log
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()  # steps come from both sides' threads
        self._last: tuple[str, float] | None = None

    def __call__(self, step: ChunkStep) -> None:
        now = self._clock()
        with self._lock:
            if self._last is not None and self._last[0] == step.step and now - self._last[1] < self._every:
                return
            self._last = (step.step, now)
        fields = {"table": step.table, "chunk": step.chunk, "step": step.step, "done": step.done, "unit": step.unit}
        self._log("validation chunk step", extra={**fields, "total": step.total})


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ChunkRequest.model_validate(event)
    migration = request.parsed()
    source_dsn, target_dsn = dsns(migration)
    with SessionPair.open(source_dsn, target_dsn) as pair:
        replication = request.chunk.replication
        if replication is not None and migration.engine.type in ("debezium", "dms"):
            # Re-checks wait until the engine applied everything committed so far (no subscription to ask).
            engine = (
                build_debezium_engine(migration, source_dsn, target_dsn)
                if migration.engine.type == "debezium"
                else build_dms_stream(migration, source_dsn, target_dsn)
            )
            timeout = replication.timeout_seconds

            def catch_up() -> None:
                engine.catch_up(timeout)

            pair.catch_up = catch_up
        result = compare_chunk(pair, request.chunk, on_step=StepLog(logger.info))
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=migration.name)
    metrics.add_metric(name=telemetry.VALIDATION_CHUNKS_DONE, unit=MetricUnit.Count, value=1)
    metrics.add_metric(
        name=telemetry.VALIDATION_MISMATCHED_ROWS,
        unit=MetricUnit.Count,
        value=result.differences + result.unsettled.count,
    )
    # Counts only: keys are data, they travel in the result, not in the logs.
    logger.info(
        "validation chunk compared",
        extra={
            "table": result.table,
            "chunk": result.chunk,
            "source_rows": result.source_rows,
            "target_rows": result.target_rows,
            "differences": result.differences,
            "unsettled": result.unsettled.count,
            "transient": result.transient,
            "seconds": result.seconds,
        },
    )
    if request.results is not None:
        validation_store().store_result(request.results, result)
        receipt = ChunkReceipt(
            table=result.table, chunk=result.chunk, differences=result.differences, unsettled=result.unsettled.count
        )
        return receipt.model_dump(mode="json")
    return result.model_dump(mode="json")
