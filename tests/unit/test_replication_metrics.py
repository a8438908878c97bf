"""The replication handler publishes the metrics the alarms read: names, namespace, dimensions."""

from __future__ import annotations

from typing import Any

from lambdas.core import telemetry
from lambdas.core.config import parse_migration
from lambdas.core.engines.base import Phase, ReplicationStatus, SlotHealth, TableStatus, TableSyncState
from lambdas.handlers import replication
from lambdas.handlers.runtime import metrics

MIGRATION = parse_migration(
    {"name": "shop-orders", "source": {"dsn": "host=127.0.0.1"}, "target": {"dsn": "host=127.0.0.1 port=5433"}}
)


def _published() -> dict[str, Any]:
    """The EMF document Powertools would print; single values unwrapped (EMF holds lists)."""
    document: dict[str, Any] = metrics.serialize_metric_set()
    metrics.clear_metrics()
    return {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in document.items()}


def test_status_metrics_carry_the_alarm_names_and_dimensions() -> None:
    status = ReplicationStatus(
        "logical",
        Phase.STREAMING,
        tables=[TableStatus("public.a", TableSyncState.READY), TableStatus("public.b", TableSyncState.COPYING)],
        lag_bytes=2048,
        lag_seconds=1.5,
        slot=SlotHealth("zdm_shop_orders", exists=True, active=True, wal_status="reserved", retained_wal_bytes=4096),
    )
    replication.publish_status_metrics(MIGRATION, status)
    document = _published()
    directive = document["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == telemetry.NAMESPACE
    assert set(directive["Dimensions"][0]) == {telemetry.SERVICE_DIMENSION, telemetry.MIGRATION_DIMENSION}
    assert (document["service"], document["migration"]) == ("zdm", "shop-orders")
    assert document[telemetry.REPLICATION_LAG_SECONDS] == 1.5
    assert document[telemetry.REPLICATION_LAG_BYTES] == 2048
    assert document[telemetry.SLOT_RETAINED_WAL_BYTES] == 4096
    assert document[telemetry.SLOT_LOST] == 0
    assert document[telemetry.REPLICATION_FAILED] == 0
    assert document[telemetry.TABLES_READY_PERCENT] == 50.0


def test_a_lost_slot_and_a_failed_engine_are_published_as_one() -> None:
    status = ReplicationStatus(
        "logical", Phase.FAILED, slot=SlotHealth("zdm_shop_orders", exists=True, wal_status="lost")
    )
    replication.publish_status_metrics(MIGRATION, status)
    document = _published()
    assert document[telemetry.SLOT_LOST] == 1 and document[telemetry.REPLICATION_FAILED] == 1
