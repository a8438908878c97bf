"""Replication task: start, status, stop or teardown of the migration's engine."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Literal

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import Field

from lambdas.core import polling, telemetry
from lambdas.core.catalog import list_tables
from lambdas.core.changestream.connector import connector_properties, publication_name, slot_name
from lambdas.core.changestream.kafka import KafkaStream
from lambdas.core.changestream.runtime import ChangeStreamRuntime
from lambdas.core.config import Migration
from lambdas.core.db import connect
from lambdas.core.engines.base import Phase, ReplicationEngine, ReplicationStatus, StartResult, TableSyncState
from lambdas.core.engines.debezium import DebeziumEngine, DebeziumPlan
from lambdas.core.engines.dms import DmsEngine, DmsTarget
from lambdas.core.engines.dms_fence import DmsForwardStream
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.tables import TableName, select_tables
from lambdas.handlers.runtime import MigrationEvent, aws_client, dsns, logger, metrics, tracer

# Set by the CDK stack on the replication function: the DMS task or serverless replication to drive,
# and the CDC-only DMS task that writes the change stream to MSK (started with the migration).
DMS_TARGET_ENV = "ZDM_DMS_TARGET"
DMS_CHANGE_STREAM_ENV = "ZDM_DMS_CHANGE_STREAM"
# The debezium engine's runtime: {"backend": "msk", ...} set by the stack (MSK Connect + the applier
# Lambda), or {"backend": "local", ...} set by the rehearsal (local broker, connector and applier processes).
CHANGE_STREAM_ENV = "ZDM_CHANGE_STREAM"


class ReplicationRequest(MigrationEvent):
    action: Literal["start", "status", "stop", "teardown", "add_tables"]
    # status, from the state machine's copy loop: when the execution began and the file's poll interval
    since: datetime | None = None
    poll_seconds: int | None = Field(default=None, ge=0)
    # status, from the copy loop's previous poll: since when the status has reported problems without a break
    problems_since: datetime | None = None


def build_engine(migration: Migration, source_dsn: str, target_dsn: str) -> ReplicationEngine:
    """The logical engine over the migration's selected tables."""
    if migration.engine.type != "logical":
        raise ValueError(f"build_engine builds the logical engine; engine {migration.engine.type!r} is built elsewhere")
    source = connect(source_dsn)
    try:
        tables = select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
    finally:
        source.close()
    plan = LogicalReplicationPlan(ReplicationNames(migration.slot_name), tuple(tables), migration.engine.logical)
    return LogicalEngine(source_dsn, target_dsn, plan)


def build_dms_engine(environ: Mapping[str, str] = os.environ, variable: str = DMS_TARGET_ENV) -> DmsEngine:
    """The DMS engine over the task the stack created (its ARN and metric dimensions in the environment)."""
    raw = environ.get(variable)
    if not raw:
        raise ValueError(f"engine 'dms' runs on AWS only: {variable} is not set (deploy the stack)")
    return DmsEngine(aws_client("dms"), aws_client("cloudwatch"), DmsTarget.from_json(raw))


def change_stream_engine(environ: Mapping[str, str] = os.environ) -> DmsEngine | None:
    """The CDC-only task feeding the change stream, when the file asks for one."""
    return build_dms_engine(environ, DMS_CHANGE_STREAM_ENV) if environ.get(DMS_CHANGE_STREAM_ENV) else None


def _selected_tables(migration: Migration, source_dsn: str) -> list[TableName]:
    source = connect(source_dsn)
    try:
        return select_tables(list_tables(source), migration.tables.include, migration.tables.exclude)
    finally:
        source.close()


def _msk_kafka_config(bootstrap: str, region: str) -> dict[str, Any]:
    """confluent-kafka settings for MSK's IAM sign-in (SASL/OAUTHBEARER with a SigV4 token)."""
    from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # only on AWS

    def token(_: object) -> tuple[str, float]:
        value, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return value, expiry_ms / 1000

    return {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "OAUTHBEARER",
        "oauth_cb": token,
    }


def _runtime(
    migration: Migration, tables: Sequence[TableName], source_dsn: str, environ: Mapping[str, str]
) -> tuple[ChangeStreamRuntime, KafkaStream, dict[str, str]]:
    """The runtime the environment names, the Kafka access beside it, and the connector's settings."""
    raw = environ.get(CHANGE_STREAM_ENV)
    if not raw:
        raise ValueError(
            f"engine 'debezium' needs its change stream, and {CHANGE_STREAM_ENV} is not set: deploy the stack,"
            " or rehearse locally with `python -m rehearsal --engine debezium`"
        )
    backend = json.loads(raw).get("backend")
    if backend == "local":
        # The rehearsal's processes; imported here only (this module is the composition root).
        from rehearsal.changestream import LocalChangeStream, LocalStreamSettings, local_connector

        local = LocalStreamSettings.from_json(json.loads(raw))
        connector = local_connector(migration, tables, source_dsn)
        return LocalChangeStream(local), KafkaStream({"bootstrap.servers": local.bootstrap}), connector
    if backend == "msk":
        from lambdas.core.changestream.msk_runtime import MskChangeStream, MskChangeStreamSettings, secret_reference

        msk = MskChangeStreamSettings.from_json(raw)
        endpoint = migration.source
        if endpoint.secret_arn is None or endpoint.host is None or endpoint.database is None:
            raise ValueError("engine 'debezium' on AWS needs source.secret_arn, source.host and source.database")
        connector = connector_properties(
            migration,
            tables,
            host=endpoint.host,
            port=endpoint.port,
            dbname=endpoint.database,
            user=secret_reference(endpoint.secret_arn, "username"),
            password=secret_reference(endpoint.secret_arn, "password"),
        )
        kafka = KafkaStream(_msk_kafka_config(msk.bootstrap_servers, environ.get("AWS_REGION", "us-east-1")))
        runtime = MskChangeStream(aws_client("kafkaconnect"), aws_client("lambda"), msk, kafka.ensure_topics)
        return runtime, kafka, connector
    raise ValueError(f"{CHANGE_STREAM_ENV} names backend {backend!r}; expected 'msk' or 'local'")


def build_debezium_engine(
    migration: Migration, source_dsn: str, target_dsn: str, environ: Mapping[str, str] = os.environ
) -> DebeziumEngine:
    tables = _selected_tables(migration, source_dsn)
    runtime, kafka, connector = _runtime(migration, tables, source_dsn, environ)
    plan = DebeziumPlan(
        migration.topic_prefix,
        slot_name(migration),
        publication_name(migration),
        tuple(tables),
        connector,
        migration.engine.logical.lock_wait_seconds,
    )
    return DebeziumEngine(source_dsn, target_dsn, plan, runtime, kafka)


def build_dms_stream(migration: Migration, source_dsn: str, target_dsn: str) -> DmsForwardStream:
    """The dms engine with the cutover's fence marker (created on both databases before the task starts)."""
    return DmsForwardStream(build_dms_engine(), source_dsn, target_dsn, migration.name)


def engine_for(migration: Migration) -> ReplicationEngine:
    if migration.engine.type == "dms":
        return build_dms_stream(migration, *dsns(migration))
    if migration.engine.type == "debezium":
        return build_debezium_engine(migration, *dsns(migration))
    return build_engine(migration, *dsns(migration))


def publish_status_metrics(migration: Migration, status: ReplicationStatus) -> None:
    """The metrics the monitoring construct alarms on (names in lambdas.core.telemetry)."""
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=migration.name)
    if status.lag_seconds is not None:
        metrics.add_metric(name=telemetry.REPLICATION_LAG_SECONDS, unit=MetricUnit.Seconds, value=status.lag_seconds)
    if status.lag_bytes is not None:
        metrics.add_metric(name=telemetry.REPLICATION_LAG_BYTES, unit=MetricUnit.Bytes, value=status.lag_bytes)
    if status.slot is not None:
        if status.slot.retained_wal_bytes is not None:
            metrics.add_metric(
                name=telemetry.SLOT_RETAINED_WAL_BYTES, unit=MetricUnit.Bytes, value=status.slot.retained_wal_bytes
            )
        slot_lost = status.slot.lost or (status.phase is not Phase.NOT_STARTED and not status.slot.exists)
        metrics.add_metric(name=telemetry.SLOT_LOST, unit=MetricUnit.Count, value=int(slot_lost))
    metrics.add_metric(
        name=telemetry.REPLICATION_FAILED, unit=MetricUnit.Count, value=int(status.phase is Phase.FAILED)
    )
    if status.dead_letters is not None:
        metrics.add_metric(name=telemetry.DEAD_LETTERS, unit=MetricUnit.Count, value=status.dead_letters)
    if status.tables:
        ready = sum(t.state is TableSyncState.READY for t in status.tables)
        metrics.add_metric(
            name=telemetry.TABLES_READY_PERCENT, unit=MetricUnit.Percent, value=100.0 * ready / len(status.tables)
        )


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ReplicationRequest.model_validate(event)
    migration = request.parsed()
    engine = engine_for(migration)
    stream = change_stream_engine()
    if request.action == "start":
        if stream is not None:  # changes flow to the stream from before the copy starts
            stream.start()
        return start_for_state(engine.start())
    if request.action == "stop":  # the change stream keeps running: its consumers are not rolled back
        engine.stop()
        return {"stopped": True}
    if request.action == "add_tables":  # the copy loop, when the status says tables_to_add
        if not isinstance(engine, LogicalEngine):
            raise ValueError(
                f"engine {migration.engine.type!r} cannot add tables created after the start: only engine logical does"
            )
        added = engine.add_tables()
        logger.info("tables added", extra={"added": added.added, "waiting": added.waiting})
        return asdict(added)
    if request.action == "teardown":
        removed = engine.teardown().removed
        if stream is not None:
            removed += stream.teardown().removed
        return {"removed": removed}
    status = engine.status()
    publish_status_metrics(migration, status)
    lasting = problems_for_state(request, status.problems, migration.lag.problems_max_seconds)
    return {**status_for_state(status), **poll_for_state(request), **lasting}


def problems_for_state(
    request: ReplicationRequest, problems: Sequence[str], limit_seconds: float, now: datetime | None = None
) -> dict[str, Any]:
    """Since when the status has reported problems without a break (carried from poll to poll by the copy
    loop), and whether that is longer than allowed: the loop then rolls back naming them, instead of
    waiting its whole history budget (12 days) for a lag that a stuck replication never brings down."""
    if not problems:
        return {"problems_since": None, "problems_lasting": False}
    now = now or datetime.now(UTC)
    since = request.problems_since or now
    since = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
    return {"problems_since": since.isoformat(), "problems_lasting": (now - since).total_seconds() >= limit_seconds}


def poll_for_state(request: ReplicationRequest, now: datetime | None = None) -> dict[str, Any]:
    """When the copy loop polls next, and whether it may go on (`lambdas.core.polling`)."""
    base = request.poll_seconds or 0
    if request.since is None:
        return {"next_poll_seconds": base, "within_history_budget": True}
    since = request.since if request.since.tzinfo is not None else request.since.replace(tzinfo=UTC)
    waited = ((now or datetime.now(UTC)) - since).total_seconds()
    return {
        "next_poll_seconds": polling.next_poll_seconds(waited, base),
        "within_history_budget": polling.within_history_budget(waited),
    }


STATUS_TABLES_SHOWN = 50


def start_for_state(result: StartResult) -> dict[str, Any]:
    """The start as the task returns it (the state keeps it to the end, within 256 KiB with the rest):
    the first STATUS_TABLES_SHOWN tables' names and how many there are."""
    out = asdict(result)
    out["tables"] = result.tables[:STATUS_TABLES_SHOWN]
    out["tables_count"] = len(result.tables)
    return out


def status_for_state(status: ReplicationStatus) -> dict[str, Any]:
    """The status as the task returns it: a task's result may not pass 256 KiB (States.DataLimitExceeded,
    which no Catch on States.ALL catches), and one entry per table passes it at ~2,400 tables. The
    tables not ready yet (the first STATUS_TABLES_SHOWN), and how many tables are in each state."""
    out = status.to_json()
    waiting = [t for t in out["tables"] if t["state"] is not TableSyncState.READY]
    out["tables"] = waiting[:STATUS_TABLES_SHOWN]
    out["tables_by_state"] = {str(k): v for k, v in Counter(t.state for t in status.tables).items()}
    out["add_tables"] = bool(status.tables_to_add)  # the copy loop's AddNewTables runs next
    return out
