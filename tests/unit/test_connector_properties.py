"""The Debezium connector's settings as the migration file shapes them (lambdas/core/changestream/connector.py)."""

from __future__ import annotations

from typing import Any

from lambdas.core.changestream.connector import connector_properties
from lambdas.core.config import parse_migration
from lambdas.core.tables import TableName

MINIMAL: dict[str, Any] = {
    "name": "shop-orders",
    "source": {"dsn": "host=127.0.0.1 port=5432 dbname=orders user=app"},
    "target": {"dsn": "host=127.0.0.1 port=5433 dbname=orders user=app"},
    "engine": {"type": "debezium"},
}


def properties(**debezium: Any) -> dict[str, str]:
    data = {**MINIMAL, "engine": {"type": "debezium", "debezium": debezium}}
    migration = parse_migration(data, "test.yaml")
    return connector_properties(
        migration,
        [TableName("public", "orders")],
        host="db.internal",
        port=5432,
        dbname="orders",
        user="app",
        password="${secretsmanager:arn:password}",
    )


def test_a_lost_connection_is_retried_every_3_s_for_about_5_minutes_by_default() -> None:
    # Given the file's defaults
    # When the connector's settings are made
    settings = properties()
    # Then Debezium starts again 3 s after a retriable failure (its own default waits 10 s, which a source
    # restarted inside the cutover's fence would add to the write pause), 100 times before it fails
    assert settings["retriable.restart.connector.wait.ms"] == "3000"
    assert settings["errors.max.retries"] == "100"


def test_the_file_sets_the_wait_and_the_retries() -> None:
    # Given a file that sets both
    settings = properties(restart_wait_ms=10_000, max_retries=30)
    # Then the connector gets them as they are
    assert settings["retriable.restart.connector.wait.ms"] == "10000"
    assert settings["errors.max.retries"] == "30"
