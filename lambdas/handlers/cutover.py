"""Cutover task: fence, catch up, sequences, back replication, writer switch, unfence.

Actions: `run` the cutover; `rollback` (the state machine's rollback branch: before cutover,
reads back and forward replication stopped; after it, the protocol target -> source over the
back replication); `retire_reverse` (after the rollback window: the source catches up with
the target, then the back replication is dropped; a later rollback is refused); `status`.
One task runs a whole protocol: its pause is the sum of its
steps, and a state machine transition between steps would add to it. Step Functions retries
the task; a retried or re-invoked one resumes at the first step not recorded (see
lambdas/core/cutover). The alarm-triggered function that starts a rollback execution is
`rollback`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.catalog import list_tables
from lambdas.core.config import Migration
from lambdas.core.cutover import CutoverPlan, CutoverRunner, RollbackReadiness
from lambdas.core.cutover.runner import ForwardChangeStream
from lambdas.core.db import DatabaseUnreachable, connect
from lambdas.core.routers import TrafficRouter, router_for
from lambdas.core.tables import select_tables
from lambdas.handlers.replication import build_debezium_engine, build_dms_stream
from lambdas.handlers.runtime import MigrationEvent, aws_client, dsns, logger, metrics, tracer


class CutoverRequest(MigrationEvent):
    action: Literal["run", "rollback", "retire_reverse", "close_records", "status"] = "run"


TRAFFIC_ENV = "ZDM_TRAFFIC"  # set by stacks/orchestration.py: the zone, record names and proxies the stack made


def stack_hosted_zone_id() -> str | None:
    """The private zone the stack created (when the migration file names none)."""
    raw = os.environ.get(TRAFFIC_ENV)
    return str(json.loads(raw).get("hosted_zone_id") or "") or None if raw else None


def build_router(migration: Migration) -> TrafficRouter:
    kind = migration.router.type
    zone_id = migration.router.route53.hosted_zone_id or stack_hosted_zone_id()
    needs_route53 = kind == "route53" or (kind == "rds-proxy" and zone_id is not None)
    return router_for(
        migration,
        route53_client=aws_client("route53") if needs_route53 else None,
        rds_client=aws_client("rds") if kind == "rds-proxy" else None,
        hosted_zone_id=zone_id,
    )


def build_runner(migration: Migration, *, forward_stream: bool = True) -> CutoverRunner:
    """The migration's cutover runner; without its `forward_stream` (debezium, dms) for what needs only the
    back replication (the rollback window's checks)."""
    source_dsn, target_dsn = dsns(migration)
    source = connect(source_dsn)
    try:
        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
    finally:
        source.close()
    # The debezium and dms engines carry source -> target themselves: the cutover waits for, stops and retires them.
    stream: ForwardChangeStream | None = None
    if forward_stream and migration.engine.type == "debezium":
        stream = build_debezium_engine(migration, source_dsn, target_dsn)
    elif forward_stream and migration.engine.type == "dms":
        stream = build_dms_stream(migration, source_dsn, target_dsn)
    return CutoverRunner(
        source_dsn,
        target_dsn,
        build_router(migration),
        CutoverPlan.for_migration(migration, tables),
        forward_stream=stream,
    )


def rollback_readiness(migration: Migration) -> RollbackReadiness:
    """Whether a rollback would run now (the rollback window's checks), having added to the back replication a
    table created on the target after the cutover once the source has it too; a database out of reach, while
    the runner is built (it lists the source's tables), is a problem to report like one found later."""
    try:
        runner = build_runner(migration, forward_stream=False)
    except DatabaseUnreachable as exc:
        return RollbackReadiness.unreachable(exc)
    return runner.rollback_readiness(add_new_tables=True)


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = CutoverRequest.model_validate(event)
    runner = build_runner(request.parsed())
    if request.action == "status":
        return runner.status()
    operations = {
        "run": runner.cutover,
        "rollback": runner.rollback,
        "retire_reverse": runner.retire_reverse,
        "close_records": runner.close_records,
    }
    result = operations[request.action]()
    metric = {"run": "CutoverPauseSeconds", "rollback": "RollbackPauseSeconds"}.get(request.action)
    if metric is not None and result.pause_seconds is not None:
        metrics.add_metric(name=metric, unit=MetricUnit.Seconds, value=result.pause_seconds)
    logger.info(
        f"{result.operation} finished",
        extra={
            "kind": result.kind,
            "status": result.status,
            "attempt": result.attempt,
            "pause_seconds": result.pause_seconds,
            "notes": result.notes,
        },
    )
    return result.to_json()
