"""Debezium PostgreSQL connector settings, the same for MSK Connect and the local embedded engine.

Every setting that changes what reaches the target is chosen here, on purpose:
- `decimal.handling.mode=string`: numeric arrives as its exact decimal text (the default,
  `precise`, is base64 of the unscaled bytes; `double` loses digits).
- `time.precision.mode=adaptive_time_microseconds`: timestamp/time keep their microseconds
  (PostgreSQL's own precision); timestamptz always arrives as ISO-8601 text with its offset.
- `binary.handling.mode=hex`, `interval.handling.mode=string` (ISO-8601 durations),
  `hstore.handling.mode=json`: text forms the applier casts back without loss.
- `tombstones.on.delete=true`: a delete is followed by a null-valued record so that a
  compacted topic forgets the row; the applier treats tombstones as no-ops.
- `skipped.operations=none`: truncates are streamed too (Debezium skips them by default).
- `heartbeat.interval.ms` with `heartbeat.action.query` emitting a non-transactional logical
  message: WAL advances even on an idle source, so the slot's confirmed position moves and
  the slot does not pin WAL; it needs no heartbeat table and works on a read-only source.
- `unavailable.value.placeholder`: an unchanged TOASTed column (REPLICA IDENTITY DEFAULT) arrives
  as this marker; the applier never writes it and keeps the target's value instead.
- `snapshot.mode=initial`: snapshot every selected table, then stream from the slot.
- `provide.transaction.metadata=false`: ordering comes from `source.sequence`, which is
  [last committed LSN, change LSN] and grows in stream order; the applier guards on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lambdas.core.db import UNBOUNDED_SESSION
from lambdas.core.tables import TableName

if TYPE_CHECKING:  # the applier imports this module: it need not build the migration file's models
    from lambdas.core.config import Migration

UNAVAILABLE_PLACEHOLDER = "__zdm_unchanged_toast__"
HEARTBEAT_PREFIX = "zdm-heartbeat"
FENCE_PREFIX = "zdm-fence"
CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"


def table_topic(prefix: str, table: TableName) -> str:
    """Debezium's default topic for a table: <prefix>.<schema>.<table>."""
    return f"{prefix}.{table.schema}.{table.name}"


def message_topic(prefix: str) -> str:
    """Where logical decoding messages (the fence marker) arrive."""
    return f"{prefix}.message"


def heartbeat_topic(prefix: str) -> str:
    return f"__debezium-heartbeat.{prefix}"


def dead_letter_topic(prefix: str) -> str:
    return f"{prefix}.dlq"


def publication_name(migration: Migration) -> str:
    return f"{migration.slot_name}_dbz"


def slot_name(migration: Migration) -> str:
    return f"{migration.slot_name}_dbz"


def connector_properties(
    migration: Migration,
    tables: Sequence[TableName],
    *,
    host: str,
    port: int,
    dbname: str,
    user: str,
    password: str,
) -> dict[str, str]:
    """The connector configuration (no offset storage: MSK Connect and the embedded engine differ there).

    `password` is the literal password locally and a config-provider reference on MSK Connect;
    the result holds it, so it is never logged.
    """
    settings = migration.engine.debezium
    return {
        "connector.class": CONNECTOR_CLASS,
        "tasks.max": "1",  # a PostgreSQL connector reads one slot: one task
        "plugin.name": "pgoutput",
        "database.hostname": host,
        "database.port": str(port),
        "database.dbname": dbname,
        "database.user": user,
        "database.password": password,
        "topic.prefix": migration.topic_prefix,
        "slot.name": slot_name(migration),
        "publication.name": publication_name(migration),
        # The engine makes the publication before the connector starts, bounding its wait for the tables'
        # locks (`DebeziumEngine._ensure_publication`); the connector would otherwise create or alter it itself.
        "publication.autocreate.mode": "disabled",
        "table.include.list": ",".join(f"{t.schema}.{t.name}" for t in tables),
        "snapshot.mode": "initial",
        # The snapshot's JDBC sessions: a row-level security policy hiding rows from this role fails the
        # snapshot instead of leaving the hidden rows silently behind (the engine and preflight refuse first);
        # the server's timeouts do not cancel a table's snapshot SELECT or its transaction (db.UNBOUNDED_SESSION).
        "database.initial.statements": "; ".join(
            ["SET row_security = off", *(f"SET {name} = {value}" for name, value in UNBOUNDED_SESSION)]
        ),
        "snapshot.fetch.size": str(settings.snapshot_fetch_size),
        "max.batch.size": str(settings.max_batch_size),
        "errors.max.retries": str(settings.max_retries),
        "retriable.restart.connector.wait.ms": str(settings.restart_wait_ms),
        # How long the connector waits to fill a batch (default 500 ms): the cutover's fence marker,
        # alone in its batch, would wait that long while clients are held.
        "poll.interval.ms": "20",
        "decimal.handling.mode": "string",
        "time.precision.mode": "adaptive_time_microseconds",
        "binary.handling.mode": "hex",
        "interval.handling.mode": "string",
        "hstore.handling.mode": "json",
        "tombstones.on.delete": "true",
        "skipped.operations": "none",
        "unavailable.value.placeholder": UNAVAILABLE_PLACEHOLDER,
        "heartbeat.interval.ms": str(settings.heartbeat_interval_ms),
        "heartbeat.action.query": f"SELECT pg_logical_emit_message(false, '{HEARTBEAT_PREFIX}', '')",
        "message.prefix.exclude.list": HEARTBEAT_PREFIX,
        "provide.transaction.metadata": "false",
        # one partition per table topic: one table's changes (truncates included) stay in order
        "topic.creation.default.partitions": "1",
        "topic.creation.default.replication.factor": "-1",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
    }
