"""Creating the replication slot while a session sits idle in a transaction that wrote (against real servers).

Before: CREATE_REPLICATION_SLOT (and CREATE SUBSCRIPTION, which makes its slot the same way) waited for
that transaction with no end and no word; the engine's start hung until its function timed out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg2.extras
import pytest

from lambdas.core.config import LogicalSettings
from lambdas.core.db import Connection, connect, execute
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.engines.slot_creation import BlockingTransaction, SlotCreationBlocked, create_logical_slot
from lambdas.core.preflight.facts import gather_server
from lambdas.core.tables import TableName
from tests.conftest import server_pair
from tests.integration.db_env import query, run_sql

T = TableName("public", "t")


@pytest.fixture
def tables(fresh_dbs: tuple[str, str]) -> tuple[str, str]:
    source_dsn, target_dsn = fresh_dbs
    run_sql(
        source_dsn,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g",
    )
    run_sql(target_dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    run_sql(source_dsn, "CREATE TABLE side (x int)")
    return fresh_dbs


@pytest.fixture
def forgotten_session(tables: tuple[str, str]) -> Iterator[Connection]:
    """A session on the source that wrote and then sat idle in its transaction (a forgotten psql, a stuck job)."""
    blocker = connect(tables[0], autocommit=False, application_name="nightly-report")
    execute(blocker, "INSERT INTO side VALUES (1)")
    try:
        yield blocker
    finally:
        blocker.close()


def slots(source_dsn: str) -> list[str]:
    return [r[0] for r in query(source_dsn, "SELECT slot_name FROM pg_replication_slots")]


@pytest.mark.parametrize("copy_method", ["parallel-snapshot", "subscription"])
def test_a_start_blocked_by_an_open_transaction_fails_naming_it_and_leaves_nothing(
    tables: tuple[str, str], forgotten_session: Connection, copy_method: str
) -> None:
    # Given a session idle in a transaction that wrote, and an engine allowed to wait 2 s for it
    source_dsn, target_dsn = tables
    settings = LogicalSettings(copy_method=copy_method, slot_wait_seconds=2)
    engine = LogicalEngine(source_dsn, target_dsn, LogicalReplicationPlan(ReplicationNames("zdm_wait"), (T,), settings))
    blocker_pid = forgotten_session.get_backend_pid()
    try:
        # When the engine starts, Then it fails after the wait, naming the session and what to do
        with pytest.raises(SlotCreationBlocked) as raised:
            engine.start()
        message = str(raised.value)
        assert f"pid {blocker_pid} (user postgres, application nightly-report, idle in transaction" in message
        assert "pg_terminate_backend" in message
        assert [b.pid for b in raised.value.blockers] == [blocker_pid]
        # And no slot or subscription is left, and nothing was copied
        assert slots(source_dsn) == []
        assert query(target_dsn, "SELECT count(*) FROM pg_subscription")[0][0] == 0
        assert query(target_dsn, "SELECT count(*) FROM t")[0][0] == 0

        # And once the session's transaction ends, the same start copies every row
        forgotten_session.commit()
        engine.start()
        assert _wait_rows(target_dsn, 100) == 100
    finally:
        engine.teardown()


def _wait_rows(dsn: str, rows: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    count = int(query(dsn, "SELECT count(*) FROM t")[0][0])
    while count < rows and time.monotonic() < deadline:
        time.sleep(0.1)
        count = int(query(dsn, "SELECT count(*) FROM t")[0][0])
    return count


def test_a_transaction_that_ends_within_the_wait_is_reported_and_the_slot_is_made(
    tables: tuple[str, str], forgotten_session: Connection
) -> None:
    # Given the open transaction ends a second after the slot's creation starts
    source_dsn, _ = tables
    heard: list[list[BlockingTransaction]] = []
    ender = threading.Timer(1.0, forgotten_session.commit)
    repl = connect(source_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    monitor = connect(source_dsn)
    try:
        ender.start()
        # When the slot is created, allowed to wait 30 s
        created = create_logical_slot(
            repl, monitor, "zdm_probe", export_snapshot=False, wait_seconds=30, on_blocked=heard.append
        )
    finally:
        ender.join()
        repl.close()
    try:
        # Then it is made, with no snapshot exported, after the watcher named the session that held it up
        assert created.snapshot is None and created.consistent_lsn
        assert slots(source_dsn) == ["zdm_probe"]
        assert heard and heard[0][0].pid == forgotten_session.get_backend_pid()
        assert heard[0][0].state == "idle in transaction"
    finally:
        execute(monitor, "SELECT pg_drop_replication_slot('zdm_probe')")
        monitor.close()


def test_a_prepared_transaction_blocking_the_slot_is_named_by_its_gid() -> None:
    # Given a two-phase transaction that wrote, prepared and left for its coordinator to resolve
    # (pg_blocking_pids names it as pid 0: the watcher finds it by the transaction id it waits on)
    with server_pair("slotprep", {"max_prepared_transactions": "5"}) as (source, _):
        dsn = source.dsn("postgres")
        run_sql(dsn, "CREATE TABLE side (x int)")
        branch = connect(dsn, autocommit=False)
        execute(branch, "INSERT INTO side VALUES (1)")
        execute(branch, "PREPARE TRANSACTION 'branch-7'")
        branch.close()
        repl = connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        monitor = connect(dsn)
        try:
            # When a slot is created, allowed to wait 1 s, Then it fails naming the prepared transaction
            with pytest.raises(SlotCreationBlocked, match=r"prepared transaction 'branch-7' \(owner postgres"):
                create_logical_slot(repl, monitor, "zdm_probe", export_snapshot=True, wait_seconds=1)
            assert slots(dsn) == []
            # And preflight's facts name it too, whatever its age
            assert [(b.gid, b.state) for b in gather_server(monitor).open_write_transactions] == [
                ("branch-7", "prepared")
            ]
        finally:
            execute(monitor, "ROLLBACK PREPARED 'branch-7'")
            repl.close()
            monitor.close()


def test_preflight_facts_name_the_sessions_a_slot_would_wait_for_and_not_readers(
    tables: tuple[str, str], forgotten_session: Connection
) -> None:
    # Given, beside the session that wrote, one idle in a transaction that only read (it holds no transaction id)
    source_dsn, _ = tables
    reader = connect(source_dsn, autocommit=False, application_name="dashboard")
    query_conn = connect(source_dsn)
    try:
        execute(reader, "SELECT count(*) FROM t")
        # When preflight gathers the source's facts (every transaction counting as long here)
        facts = gather_server(query_conn, long_transaction_seconds=0)
    finally:
        reader.close()
        query_conn.close()
    # Then only the writer is named, as the slot's watcher would name it
    (writer,) = facts.open_write_transactions
    assert (writer.pid, writer.application, writer.state) == (
        forgotten_session.get_backend_pid(),
        "nightly-report",
        "idle in transaction",
    )
    assert facts.sees_all_sessions
    # And with the default threshold (60 s) a transaction a moment old is not named
    fresh = connect(source_dsn)
    try:
        assert gather_server(fresh).open_write_transactions == ()
    finally:
        fresh.close()
