"""Applier task: a batch of Debezium change events from the MSK event source mapping, applied to the target.

Event -> StreamRecords -> ChangeApplier.apply (one target transaction, offsets stored beside the
rows) -> a summary. An exception fails the batch: the mapping retries it, then sends it to its
on-failure destination (SQS). Events that cannot be applied one by one are dead letters: recorded on
the target and sent to the dead-letter queue, while the rest of the batch is applied.
"""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict

from lambdas.core import telemetry
from lambdas.core.changestream.applier import ChangeApplier
from lambdas.core.changestream.deadletters import DeadLetterSink, NoDeadLetterSink
from lambdas.core.changestream.deadletters_sqs import SqsDeadLetters
from lambdas.core.changestream.events import StreamRecord
from lambdas.core.changestream.state import ensure_state_tables
from lambdas.core.changestream.target import StreamRouting
from lambdas.core.config import Migration, parse_migration
from lambdas.core.db import Connection, connect
from lambdas.core.endpoints import resolve_dsn
from lambdas.core.fence import make_writable
from lambdas.handlers.runtime import _secrets_client, aws_client, logger, metrics, tracer

SETTINGS_PARAMETER_ENV = "ZDM_SETTINGS_PARAMETER"  # the migration's settings in SSM (stacks/config.py)
DEAD_LETTER_QUEUE_URL_ENV = "ZDM_DEAD_LETTER_QUEUE_URL"


class KafkaRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    topic: str
    partition: int
    offset: int
    key: str | None = None  # base64
    value: str | None = None  # base64; absent for a tombstone


class KafkaEvent(BaseModel):
    """The MSK event source mapping's event: records grouped by '<topic>-<partition>'."""

    model_config = ConfigDict(extra="ignore")
    eventSource: str
    records: dict[str, list[KafkaRecord]]

    def stream_records(self) -> list[StreamRecord]:
        def raw(text: str | None) -> bytes | None:
            return None if text is None else base64.b64decode(text)

        return [
            StreamRecord(r.topic, r.partition, r.offset, raw(r.key), raw(r.value))
            for batch in self.records.values()
            for r in batch
        ]


@cache
def _migration() -> Migration:
    name = os.environ[SETTINGS_PARAMETER_ENV]
    value = aws_client("ssm").get_parameter(Name=name)["Parameter"]["Value"]
    return parse_migration(json.loads(value), name)


@cache
def _target() -> Connection:
    migration = _migration()
    client = _secrets_client() if migration.target.secret_arn else None
    conn = connect(resolve_dsn(migration.target, client), application_name="zdm-applier", autocommit=False)
    make_writable(conn)  # the target is fenced (read-only by default) until the cutover
    conn.commit()
    ensure_state_tables(conn)
    return conn


@cache
def _routing(topics: frozenset[str]) -> StreamRouting:
    return StreamRouting.for_topics(_target(), _migration().topic_prefix, sorted(topics))


@cache
def _sink() -> DeadLetterSink:
    url = os.environ.get(DEAD_LETTER_QUEUE_URL_ENV)
    if not url:
        return NoDeadLetterSink()
    return SqsDeadLetters(aws_client("sqs"), url)


@logger.inject_lambda_context
@metrics.log_metrics
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    records = KafkaEvent.model_validate(event).stream_records()
    target = _target()
    if target.closed:  # a connection lost between invocations is opened again
        _target.cache_clear()
        _routing.cache_clear()
        target = _target()
    applier = ChangeApplier(target, _routing(frozenset(r.topic for r in records)), _sink())
    result = applier.apply(records)
    metrics.add_dimension(name=telemetry.MIGRATION_DIMENSION, value=_migration().name)
    metrics.add_metric(name=telemetry.DEAD_LETTERS, unit=MetricUnit.Count, value=len(result.dead_letters))
    metrics.add_metric(name="ChangesApplied", unit=MetricUnit.Count, value=result.applied)
    summary = {
        "records": result.records,
        "applied": result.applied,
        "replayed": result.replayed,
        "republished": result.republished,
        "dead_letters": len(result.dead_letters),
        "last_source_lsn": result.last_source_lsn,
    }
    if result.dead_letters:
        logger.warning("dead letters", extra={"reasons": [d.reason for d in result.dead_letters][:20]})
    logger.info("batch applied", extra=summary)
    return summary
