"""Timeouts a database or role sets for its applications (statement_timeout, idle_in_transaction_session_timeout)
must not cancel the migration's long reads and writes: the copy, the table sync, the validation. Real servers,
the settings made with ALTER DATABASE ... SET, as a DBA protecting a production database would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from psycopg2.extensions import parse_dsn

from lambdas.core.config import LogicalSettings, Validation
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.engines.snapshot_copy import ChunkCopied
from lambdas.core.tables import TableName
from lambdas.core.validation import validate
from tests.integration.db_env import query, run_sql

T = TableName("public", "t")
ROWS = 1_000_000
# Far below what a COPY or a compare of a million rows takes, far above any catalog query's time.
STATEMENT_TIMEOUT = "50ms"
IDLE_IN_TRANSACTION_TIMEOUT = "300ms"
IDLE_SESSION_TIMEOUT = "300ms"  # PostgreSQL 14+: a session idle outside a transaction (between chunks, or waiting)


@pytest.fixture
def guarded(fresh_dbs: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """A million rows on the source, the empty table on the target; then both databases get the timeouts."""
    source_dsn, target_dsn = fresh_dbs
    run_sql(source_dsn, "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
    run_sql(source_dsn, f"INSERT INTO t SELECT g, 'value ' || g FROM generate_series(1, {ROWS}) g; ANALYZE t")
    run_sql(target_dsn, "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
    for dsn in fresh_dbs:
        name = parse_dsn(dsn)["dbname"]
        run_sql(
            dsn,
            f'ALTER DATABASE "{name}" SET statement_timeout = {STATEMENT_TIMEOUT!r};'
            f' ALTER DATABASE "{name}" SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT!r};'
            f' ALTER DATABASE "{name}" SET idle_session_timeout = {IDLE_SESSION_TIMEOUT!r}',
        )
    yield fresh_dbs


def target_rows(target_dsn: str) -> int:
    return int(query(target_dsn, "SET statement_timeout = 0; SELECT count(*) FROM t")[0][0])


def wait_rows(target_dsn: str, rows: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = target_rows(target_dsn)
    while count < rows and time.monotonic() < deadline:
        time.sleep(0.25)
        count = target_rows(target_dsn)
    return count


def test_the_parallel_copy_outlasts_the_databases_timeouts(guarded: tuple[str, str]) -> None:
    # Given a statement timeout far shorter than one chunk's COPY, an idle-in-transaction timeout shorter
    # than the pause between one worker's chunks (its source session waits in its snapshot's transaction)
    source_dsn, target_dsn = guarded

    def pause_between_chunks(_: ChunkCopied) -> None:
        time.sleep(0.6)

    settings = LogicalSettings(copy_method="parallel-snapshot", copy_workers=1, copy_chunk_rows=250_000)
    plan = LogicalReplicationPlan(ReplicationNames("zdm_slow"), (T,), settings)
    engine = LogicalEngine(source_dsn, target_dsn, plan, on_copy_progress=pause_between_chunks)
    try:
        # When the engine copies the million rows in four chunks through one worker
        engine.start()

        # Then every row arrives
        assert target_rows(target_dsn) == ROWS
    finally:
        engine.teardown()


def test_the_subscriptions_table_sync_outlasts_the_sources_statement_timeout(guarded: tuple[str, str]) -> None:
    # Given the source's statement timeout far shorter than the COPY its walsender runs for the table sync
    source_dsn, target_dsn = guarded
    plan = LogicalReplicationPlan(ReplicationNames("zdm_slow"), (T,), LogicalSettings(copy_method="subscription"))
    engine = LogicalEngine(source_dsn, target_dsn, plan)
    try:
        # When PostgreSQL's own table sync copies the table
        engine.start()

        # Then every row arrives (without the subscription's own settings its COPY is cancelled, again and again)
        assert wait_rows(target_dsn, ROWS, timeout=90) == ROWS
    finally:
        engine.teardown()


def test_validation_outlasts_the_databases_statement_timeout(guarded: tuple[str, str]) -> None:
    # Given the same million rows on both sides (copied before the timeouts), and one chunk of the whole table
    source_dsn, target_dsn = guarded
    run_sql(
        target_dsn,
        f"SET statement_timeout = 0; INSERT INTO t SELECT g, 'value ' || g FROM generate_series(1, {ROWS}) g",
    )
    run_sql(target_dsn, "SET statement_timeout = 0; ANALYZE t")

    # When the validator compares them, Then no statement is cancelled and the tables are equal
    summary = validate(source_dsn, target_dsn, [T], Validation(chunk_rows=ROWS, slice_rows=ROWS), workers=1)
    assert summary.ok, summary.problems
    (table,) = summary.per_table
    assert (table.source_rows, table.target_rows) == (ROWS, ROWS)
