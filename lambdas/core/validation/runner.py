"""Running a whole validation in one process: plan, chunks on a pool of session pairs, summary.

The same three steps as the state machine's plan task, Map of chunk tasks and summary task;
used by the command line, the rehearsal, the benchmark and the tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from lambdas.core.config import Validation
from lambdas.core.db import Connection, connect
from lambdas.core.tables import TableName
from lambdas.core.validation.bisect import AdaptivePolicy
from lambdas.core.validation.chunk import compare_chunk
from lambdas.core.validation.model import (
    ChunkResult,
    ChunkSpec,
    OnStep,
    Replication,
    ValidationPlan,
    ValidationSummary,
)
from lambdas.core.validation.planner import plan_validation
from lambdas.core.validation.session import SessionPair
from lambdas.core.validation.summary import summarize

OnResult = Callable[[ChunkResult, int, int], None]  # (result, chunks done, chunks planned)


def run_chunks(
    source_dsn: str,
    target_dsn: str,
    chunks: Sequence[ChunkSpec],
    *,
    workers: int,
    on_result: OnResult | None = None,
    on_step: OnStep | None = None,
    connector: Callable[..., Connection] = connect,
) -> list[ChunkResult]:
    """Compare every chunk, `workers` at a time (each worker keeps one session pair); results in plan
    order. `on_step` hears what running chunks are doing (`compare_chunk`), from the workers' threads."""
    if not chunks:
        return []
    local = threading.local()
    pairs: list[SessionPair] = []
    lock = threading.Lock()

    def session() -> SessionPair:
        pair: SessionPair | None = getattr(local, "pair", None)
        if pair is None:
            pair = SessionPair.open(source_dsn, target_dsn, connector=connector)
            local.pair = pair
            with lock:
                pairs.append(pair)
        return pair

    # Chunks of one table share what they learn about how dense its differences are.
    policies = {c.table.label: AdaptivePolicy(c.slice_rows) for c in chunks}
    results: list[ChunkResult | None] = [None] * len(chunks)
    done = 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks))), thread_name_prefix="zdm-validate")
    try:
        futures = {
            pool.submit(
                lambda c: compare_chunk(session(), c, policy=policies[c.table.label], on_step=on_step), chunk
            ): i
            for i, chunk in enumerate(chunks)
        }
        outstanding = set(futures)
        while outstanding:
            finished, outstanding = wait(outstanding, return_when=FIRST_COMPLETED)
            for future in finished:
                result = future.result()  # the first error stops the run
                results[futures[future]] = result
                done += 1
                if on_result is not None:
                    on_result(result, done, len(chunks))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for pair in pairs:
            pair.close()
    return [r for r in results if r is not None]


def validate(
    source_dsn: str,
    target_dsn: str,
    tables: Sequence[TableName],
    settings: Validation,
    *,
    replication: Replication | None = None,
    workers: int | None = None,
    on_plan: Callable[[ValidationPlan], None] | None = None,
    on_result: OnResult | None = None,
    on_step: OnStep | None = None,
    connector: Callable[..., Connection] = connect,
) -> ValidationSummary:
    """Plan, compare every chunk (`workers`, default max_parallel_chunks, at a time) and summarize."""
    with SessionPair.open(source_dsn, target_dsn, connector=connector) as pair:
        plan = plan_validation(pair, tables, settings, replication=replication)
    if on_plan is not None:
        on_plan(plan)
    results = run_chunks(
        source_dsn,
        target_dsn,
        plan.chunks,
        workers=workers or settings.max_parallel_chunks,
        on_result=on_result,
        on_step=on_step,
        connector=connector,
    )
    return summarize(plan, results, finished_at=time.time())
