"""Names of the CloudWatch metrics the handlers publish and the alarms and dashboard read.

One place, so a handler and the alarm on its metric cannot drift apart. Handlers publish
through Powertools Metrics (embedded metric format: no PutMetricData permission needed)
in `NAMESPACE`, with the dimensions `service=zdm` (Powertools' service) and
`migration=<migration name>`, so two migrations in one account never trip each other's alarms.
"""

from __future__ import annotations

NAMESPACE = "Zdm"
SERVICE = "zdm"
SERVICE_DIMENSION = "service"
MIGRATION_DIMENSION = "migration"

# Published by the replication handler (`status` action), every engine.
REPLICATION_LAG_SECONDS = "ReplicationLagSeconds"
REPLICATION_LAG_BYTES = "ReplicationLagBytes"
SLOT_RETAINED_WAL_BYTES = "SlotRetainedWalBytes"
SLOT_LOST = "SlotLost"  # 1 when the source's slot is lost (wal_status 'lost') or missing, else 0
REPLICATION_FAILED = "ReplicationFailed"  # 1 when the engine reports phase 'failed', else 0
TABLES_READY_PERCENT = "TablesReadyPercent"  # full-load progress: share of tables following the stream

# Published by the router and validation handlers (their owners publish them; the dashboard reads them).
READ_WEIGHT_TARGET_PERCENT = "ReadWeightTargetPercent"
WRITER_ON_TARGET = "WriterOnTarget"
# The rollback window (health gate): 0 once the back replication's problems have lasted lag.problems_max_seconds
# (a rollback would be refused), else 1; and the WAL its slot holds on the target.
ROLLBACK_READY = "RollbackReady"
REVERSE_SLOT_RETAINED_WAL_BYTES = "ReverseSlotRetainedWalBytes"
VALIDATION_CHUNKS_DONE = "ValidationChunksDone"
VALIDATION_CHUNKS_TOTAL = "ValidationChunksTotal"
VALIDATION_MISMATCHED_ROWS = "ValidationMismatchedRows"

# Published by the change-stream applier (engine debezium): events it could not apply and sent to the
# dead-letter queue. Any of them means the target misses a change: the alarm on it rolls back.
DEAD_LETTERS = "DeadLetters"

# Metric filters on log groups (one namespace per migration: filters cannot add dimensions).
FILTER_NAMESPACE_PREFIX = "Zdm/"
TARGET_DATABASE_ERRORS = "TargetDatabaseErrors"
DMS_TASK_FAILURES = "DmsTaskFailures"
DMS_TASK_ERRORS = "DmsTaskErrors"


def dimensions(migration_name: str) -> dict[str, str]:
    """The dimensions every handler metric carries."""
    return {SERVICE_DIMENSION: SERVICE, MIGRATION_DIMENSION: migration_name}


def filter_namespace(migration_name: str) -> str:
    return FILTER_NAMESPACE_PREFIX + migration_name


def alarm_name_prefix(migration_name: str) -> str:
    """Every alarm the stack creates for a migration starts with this."""
    return f"zdm-{migration_name}-"


def composite_alarm_name(migration_name: str) -> str:
    """The one alarm over all others: its ALARM state rolls the migration back."""
    return f"{alarm_name_prefix(migration_name)}health"
