"""The `logical` engine against two real PostgreSQL servers, with writes running."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from lambdas.core.config import LogicalSettings
from lambdas.core.db import Connection, connect, execute, fetch_value
from lambdas.core.engines.base import Phase, ReplicationStatus
from lambdas.core.engines.logical import (
    AddedTables,
    LogicalEngine,
    LogicalReplicationPlan,
    ReplicationNames,
    ReplicationSetupError,
)
from lambdas.core.engines.snapshot_copy import ChunkCopied, CopyChunk, CopyFailed
from lambdas.core.engines.table_locks import TableLocksBusy
from lambdas.core.lsn import LsnWaitTimeout, current_lsn, wait_for_lsn
from lambdas.core.sequences import sync_sequences
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.compare import compare_databases
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload
from tests.conftest import server_pair
from tests.integration.db_env import query, run_sql

TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)


def make_engine(
    src: str,
    tgt: str,
    *,
    tables: Sequence[TableName] = TABLES,
    on_copy_progress: Callable[[ChunkCopied], None] | None = None,
    **settings: object,
) -> LogicalEngine:
    opts: dict[str, object] = {"copy_workers": 3, "copy_chunk_rows": 20_000}
    opts.update(settings)
    plan = LogicalReplicationPlan(ReplicationNames("zdm_test"), tuple(tables), LogicalSettings.model_validate(opts))
    return LogicalEngine(src, tgt, plan, on_copy_progress=on_copy_progress)


def given_sample(src: str, tgt: str, rows: int) -> None:
    source, target = connect(src), connect(tgt)
    sample.create_schema(source)
    sample.create_schema(target)
    sample.load_data(source, rows)
    source.close()
    target.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def streaming_without_problems(engine: LogicalEngine) -> bool:
    """Streaming, and the apply worker up: a just-started subscription's worker may not be running yet."""
    status = engine.status()
    return status.phase is Phase.STREAMING and not status.problems


def caught_up(engine: LogicalEngine, src: str, tgt: str, timeout: float = 60) -> None:
    source, target = connect(src), connect(tgt)
    try:
        wait_for_lsn(target, "zdm_test", current_lsn(source), timeout=timeout, source=source, slot="zdm_test")
    finally:
        source.close()
        target.close()


def assert_identical(src: str, tgt: str) -> None:
    diffs = compare_databases(src, tgt, list(TABLES))
    for diff in diffs:
        assert diff.equal, (
            f"{diff.table}: {len(diff.missing_on_target)} missing, {len(diff.extra_on_target)} extra, "
            f"{len(diff.changed)} changed (e.g. {(diff.missing_on_target + diff.extra_on_target + diff.changed)[:5]})"
        )
        assert diff.source_rows == diff.target_rows


def index_exists(dsn: str, name: str) -> bool:
    conn = connect(dsn)
    try:
        return fetch_value(conn, "SELECT to_regclass(%s)", (name,)) is not None
    finally:
        conn.close()


def constraints(dsn: str) -> set[str]:
    """Primary-key and unique constraints of the sample tables."""
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT conname FROM pg_constraint WHERE contype IN ('p', 'u') AND connamespace = 'public'::regnamespace"
            )
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


def slot_exists(src: str) -> bool:
    conn = connect(src)
    try:
        return bool(fetch_value(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'zdm_test'"))
    finally:
        conn.close()


@pytest.mark.slow
def test_initial_copy_plus_live_writes_converge_row_for_row(fresh_dbs: tuple[str, str]) -> None:
    # Given a source with 1M rows over five related tables and writers running on it
    src, tgt = fresh_dbs
    given_sample(src, tgt, 1_000_000)
    workload = Workload(src, clients=4).start()
    engine = make_engine(src, tgt, copy_chunk_rows=100_000, copy_workers=4)
    try:
        # When replication starts (parallel copy from the slot's snapshot) while writes continue
        result = engine.start()
        assert result.rows_copied >= 1_000_000
        # (lag in seconds is unknown, None, until the subscriber's walsender has connected)
        wait_until(lambda: engine.status().lag_seconds is not None, 30, "the subscriber to connect")
        samples: list[ReplicationStatus] = []
        for _ in range(20):
            samples.append(engine.status())
            time.sleep(0.1)
    finally:
        stats = workload.stop()
    # Then lag is reported while writes run ...
    assert stats.committed > 100, stats.errors
    assert stats.failed == 0, stats.errors
    assert all(s.phase is Phase.STREAMING for s in samples)
    assert all(s.lag_bytes is not None and s.lag_seconds is not None for s in samples)
    assert max(s.lag_bytes or 0 for s in samples) > 0
    # ... and falls to zero once they stop
    wait_until(lambda: engine.status().lag_bytes == 0, 30, "lag_bytes to reach 0")
    assert engine.status().lag_seconds == pytest.approx(0.0, abs=0.5)
    # And the target equals the source row for row
    caught_up(engine, src, tgt)
    assert_identical(src, tgt)
    engine.teardown()


def test_sequences_synced_so_target_inserts_succeed(fresh_dbs: tuple[str, str]) -> None:
    # Given replicated data (sequences do not travel with logical replication)
    src, tgt = fresh_dbs
    given_sample(src, tgt, 5_000)
    engine = make_engine(src, tgt)
    engine.start()
    source, target = connect(src), connect(tgt)
    try:
        # When the source hands out more values, then sequences are synced with a margin
        execute(source, "INSERT INTO customers (email, name) VALUES ('late@example.com', 'Late')")
        execute(source, "INSERT INTO orders (customer_id) VALUES (1)")
        caught_up(engine, src, tgt)
        synced = sync_sequences(source, target, TABLES, margin=100)
        again = sync_sequences(source, target, TABLES, margin=100)
        engine.teardown()
        # Then every sequence used by the tables moved, including the one only named in a default
        names = {str(s.sequence) for s in synced}
        assert {
            "public.customers_id_seq",
            "public.orders_id_seq",
            "public.products_id_seq",
            "public.invoice_no_seq",
        } <= names
        assert all(s.target_next_after >= s.source_next + 100 for s in synced)
        # And running it again changes nothing (never moves a sequence backwards)
        assert not any(s.changed for s in again)
        # And inserts on the target with the default sequences succeed
        execute(target, "INSERT INTO customers (email, name) VALUES ('new@example.com', 'New')")
        execute(target, "INSERT INTO orders (customer_id) VALUES (1)")
        execute(target, "INSERT INTO products (sku, name, price) VALUES ('NEW-1', 'New', 1.00)")
        assert fetch_value(target, "SELECT count(*) FROM customers WHERE email = 'new@example.com'") == 1
    finally:
        source.close()
        target.close()


def test_start_twice_is_a_no_op_and_teardown_twice_is_clean(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    given_sample(src, tgt, 3_000)
    engine = make_engine(src, tgt)
    # When start is called twice
    first = engine.start()
    second = engine.start()
    # Then the second call finds replication running and copies nothing again
    assert not first.already_running and first.rows_copied > 0
    assert second.already_running and second.rows_copied == 0
    caught_up(engine, src, tgt)
    assert_identical(src, tgt)
    # When teardown is called twice
    removed = engine.teardown().removed
    assert sorted(removed) == ["publication zdm_test", "slot zdm_test", "subscription zdm_test"]
    assert engine.teardown().removed == []
    # Then nothing of ours is left on either side
    assert not slot_exists(src)
    assert engine.status().phase is Phase.NOT_STARTED


def test_teardown_and_restart_after_a_start_that_died_mid_copy(fresh_dbs: tuple[str, str]) -> None:
    # Given a start that fails after some chunks were copied and committed on the target
    src, tgt = fresh_dbs
    given_sample(src, tgt, 50_000)
    calls: list[ChunkCopied] = []

    def crash_after_two(chunk: ChunkCopied) -> None:
        calls.append(chunk)
        if len(calls) == 2:
            raise RuntimeError("injected crash mid-copy")

    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_test"), TABLES, LogicalSettings(copy_workers=1, copy_chunk_rows=5_000)
    )
    schema_constraints = constraints(tgt)
    failing = LogicalEngine(src, tgt, plan, on_copy_progress=crash_after_two)
    with pytest.raises(CopyFailed, match="injected crash"):
        failing.start()
    assert slot_exists(src)
    assert failing.status().phase is Phase.COPYING
    # (the secondary index is dropped for the copy, its definition recorded on the target)
    assert not index_exists(tgt, "public.orders_customer_idx")
    # (so are key constraints no foreign key needs; those a foreign key depends on stay)
    during = constraints(tgt)
    assert {"customers_pkey", "orders_pkey", "products_pkey"} <= during < schema_constraints
    # When start is simply called again
    engine = make_engine(src, tgt)
    engine.start()
    # Then the partial copy was discarded and redone: the target equals the source
    caught_up(engine, src, tgt)
    assert_identical(src, tgt)
    assert index_exists(tgt, "public.orders_customer_idx")
    assert constraints(tgt) == schema_constraints
    # And after another failed start (on an emptied target), teardown leaves nothing of ours behind
    engine.teardown()
    target = connect(tgt)
    execute(target, "TRUNCATE customers, products, orders, order_items, events")
    target.close()
    calls.clear()
    with pytest.raises(CopyFailed):
        LogicalEngine(src, tgt, plan, on_copy_progress=crash_after_two).start()
    assert not index_exists(tgt, "public.orders_customer_idx")
    assert "(restored index orders_customer_idx)" in engine.teardown().removed
    assert engine.teardown().removed == []
    assert not slot_exists(src)
    assert index_exists(tgt, "public.orders_customer_idx")
    assert constraints(tgt) == schema_constraints
    assert engine.status().phase is Phase.NOT_STARTED


def test_a_target_crash_mid_copy_is_ridden_through_each_chunk_copied_once_from_the_same_snapshot() -> None:
    # Given a copy of many chunks (own servers: the target is crashed)
    with server_pair("copycrash") as (source_server, target_server):
        src, tgt = source_server.dsn(), target_server.dsn()
        given_sample(src, tgt, 30_000)
        schema_constraints = constraints(tgt)
        counted: list[ChunkCopied] = []
        restarted = threading.Event()
        crash_lock = threading.Lock()  # both workers record chunks
        crashes: list[int] = []  # chunks counted at the crash
        engine = make_engine(src, tgt, on_copy_progress=counted.append, copy_workers=2, copy_chunk_rows=4_000)
        record_chunk = engine._record_chunk

        def crash_at_the_third_commit(target: Connection, chunk: CopyChunk, rows: int) -> None:
            record_chunk(target, chunk, rows)
            # At least two chunks counted (the other worker may have counted a third meanwhile), once
            with crash_lock:
                crash_now = len(counted) >= 2 and not crashes
                if crash_now:
                    crashes.append(len(counted))
            if crash_now:
                # When the target crashes (immediate shutdown) right as a chunk commits (durable, but its worker
                # never hears so) while another chunk is in flight, and is back 2 s later
                target.commit()
                target_server.kill()
                threading.Timer(2.0, lambda: (target_server.restart(), restarted.set())).start()
                fetch_value(target, "SELECT 1")  # the worker learns of it (as from its own commit): it raises

        engine._record_chunk = crash_at_the_third_commit  # type: ignore[method-assign]
        result = engine.start()
        # Then the start completed without a new start: the chunks in flight were copied again from the
        # same snapshot, each chunk counted once, every source row copied once
        assert restarted.is_set()
        chunks = [(c.table, c.number) for c in counted]
        assert len(chunks) == len(set(chunks)) > 10
        with closing(connect(src)) as source:
            source_rows = sum(
                fetch_value(source, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t.schema, t.name)))
                for t in TABLES
            )
        assert result.rows_copied == source_rows
        # And replication streams on from the slot: the target equals the source, with its indexes and keys back
        with closing(connect(src)) as source:
            execute(source, "UPDATE orders SET status = 'shipped' WHERE id % 7 = 0")
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming")
        caught_up(engine, src, tgt)
        assert_identical(src, tgt)
        assert index_exists(tgt, "public.orders_customer_idx")
        assert constraints(tgt) == schema_constraints
        engine.teardown()


def test_a_source_crash_mid_copy_fails_the_copy_at_once_naming_it() -> None:
    # Given a copy of many chunks
    with server_pair("copysrccrash") as (source_server, target_server):
        src, tgt = source_server.dsn(), target_server.dsn()
        given_sample(src, tgt, 30_000)
        counted: list[ChunkCopied] = []

        def crash_after_two(chunk: ChunkCopied) -> None:
            counted.append(chunk)
            if len(counted) == 2:
                source_server.kill()  # When the source crashes: its exported snapshot is gone with it
                threading.Timer(2.0, source_server.restart).start()

        engine = make_engine(src, tgt, on_copy_progress=crash_after_two, copy_workers=2, copy_chunk_rows=4_000)
        started = time.monotonic()
        # Then the copy fails (a start copies anew; nothing could resume from that snapshot), without waiting
        # for the source to come back
        with pytest.raises(CopyFailed):
            engine.start()
        assert time.monotonic() - started < 30
        time.sleep(2.5)
        wait_until(lambda: source_server.is_running(), 30, "the source to restart")
        assert engine.status().phase is Phase.COPYING


def test_refuses_to_copy_into_a_target_that_already_has_data(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    given_sample(src, tgt, 1_000)
    target = connect(tgt)
    execute(target, "INSERT INTO products (sku, name, price) VALUES ('X', 'pre-existing', 1)")
    target.close()
    with pytest.raises(ReplicationSetupError, match=r"public\.products"):
        make_engine(src, tgt).start()
    assert not slot_exists(src)


def test_stop_pauses_and_start_resumes_without_loss(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    given_sample(src, tgt, 2_000)
    engine = make_engine(src, tgt)
    engine.start()
    engine.stop()
    engine.stop()
    assert engine.status().phase is Phase.STOPPED
    source = connect(src)
    execute(source, "UPDATE orders SET note = 'while stopped' WHERE id <= 100")
    source.close()
    resumed = engine.start()
    assert resumed.already_running is False and resumed.rows_copied == 0
    caught_up(engine, src, tgt)
    assert_identical(src, tgt)
    engine.teardown()


def test_wait_for_lsn_times_out_when_the_target_does_not_apply(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    given_sample(src, tgt, 1_000)
    engine = make_engine(src, tgt)
    engine.start()
    engine.stop()
    source, target = connect(src), connect(tgt)
    try:
        execute(source, "UPDATE orders SET note = 'unapplied' WHERE id = 1")
        with pytest.raises(LsnWaitTimeout, match="did not apply"):
            wait_for_lsn(target, "zdm_test", current_lsn(source), timeout=0.5)
        engine.start()
        result = wait_for_lsn(target, "zdm_test", current_lsn(source), timeout=30, source=source, slot="zdm_test")
        assert result.reached_lsn >= result.target_lsn
        assert fetch_value(target, "SELECT note FROM orders WHERE id = 1") == "unapplied"
    finally:
        source.close()
        target.close()
        engine.teardown()


def test_subscription_copy_method_reports_table_states_until_ready(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    given_sample(src, tgt, 20_000)
    engine = make_engine(src, tgt, copy_method="subscription")
    engine.start()
    assert engine.start().already_running
    wait_until(lambda: engine.status().copy_done, 60, "table sync to finish")
    status = engine.status()
    assert {t.table for t in status.tables} == {str(t) for t in TABLES}
    caught_up(engine, src, tgt)
    assert_identical(src, tgt)
    engine.teardown()


def test_partitioned_table_replicates_through_its_root(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    ddl = (
        "CREATE TABLE measurements (id bigint, at date NOT NULL, v numeric, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
        "CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
    )
    source, target = connect(src), connect(tgt)
    execute(source, ddl)
    execute(target, ddl)
    execute(
        source,
        "INSERT INTO measurements SELECT g, date '2024-06-01' + (g % 400), g / 7.0 FROM generate_series(1, 30000) g",
    )
    execute(source, "ANALYZE measurements")
    tables = (TableName("public", "measurements"), TableName("public", "measurements_2024"))
    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_test"), tables, LogicalSettings(copy_workers=2, copy_chunk_rows=5_000)
    )
    engine = LogicalEngine(src, tgt, plan)
    result = engine.start()
    assert result.tables == ["public.measurements"]  # the selected leaf travels through its root
    assert result.rows_copied == 30_000
    execute(source, "INSERT INTO measurements VALUES (999999, '2025-03-01', 1)")
    caught_up(engine, src, tgt)
    query = sql.SQL("SELECT count(*), sum(v) FROM {}").format(sql.Identifier("measurements"))
    assert fetch_value(target, query) == fetch_value(source, query) == 30_001
    engine.teardown()
    source.close()
    target.close()


SPECIAL_KEYS_SQL = """
CREATE TABLE ts_keyed (at timestamp PRIMARY KEY, v text, zone timetz, bits varbit, shape box);
CREATE TABLE num_keyed (n numeric PRIMARY KEY, v text, times time[], stamps date[]);
INSERT INTO ts_keyed SELECT '2020-01-01'::timestamp + g * interval '1 minute', 'r', '12:00+02', B'0011', '((0,0),(1,1))'
    FROM generate_series(1, 3000) g;
INSERT INTO ts_keyed VALUES ('infinity', 'inf', NULL, NULL, NULL), ('-infinity', 'ninf', '23:59:59.999999-11:30', B'', NULL),
    ('4713-01-01 BC', 'bc', NULL, NULL, NULL);
INSERT INTO num_keyed SELECT g / 7.0, 'r', ARRAY['12:34:56.789123'::time, '24:00'], ARRAY['0044-03-15 BC'::date]
    FROM generate_series(1, 3000) g;
INSERT INTO num_keyed VALUES ('NaN', 'nan', NULL, NULL), ('Infinity', 'inf', NULL, NULL), ('-Infinity', 'ninf', NULL, NULL);
"""


def test_special_keys_and_the_types_debezium_cannot_carry_copy_and_stream_exactly(fresh_dbs: tuple[str, str]) -> None:
    # Given keys at infinity, -infinity, BC, NaN and +-Infinity, and the column types the debezium engine
    # refuses (timetz, bit varying, box, time[], BC dates in arrays), copied in chunks of 1000 rows
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        conn = connect(dsn)
        execute(conn, SPECIAL_KEYS_SQL if dsn == src else SPECIAL_KEYS_SQL.split("INSERT")[0])
        conn.close()
    tables = (TableName("public", "ts_keyed"), TableName("public", "num_keyed"))
    settings = LogicalSettings.model_validate({"copy_workers": 2, "copy_chunk_rows": 1000})
    engine = LogicalEngine(src, tgt, LogicalReplicationPlan(ReplicationNames("zdm_test"), tables, settings))
    try:
        # When replication starts and the rows at the special keys change while it streams
        assert engine.start().rows_copied == 3003 * 2
        source = connect(src)
        execute(source, "UPDATE ts_keyed SET v = 'changed', zone = '00:00+14' WHERE at IN ('infinity', '-infinity')")
        execute(source, "UPDATE num_keyed SET v = 'changed' WHERE n IN ('NaN', '-Infinity')")
        execute(source, "DELETE FROM ts_keyed WHERE at = '4713-01-01 BC'")
        source.close()
        caught_up(engine, src, tgt)
        # Then the target equals the source exactly, in every column's text form
        diffs = [d for d in compare_databases(src, tgt, list(tables)) if not d.equal]
        assert diffs == [], diffs
    finally:
        engine.teardown()


def test_a_failed_subscription_leaves_no_password_in_the_target_servers_log(
    pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]
) -> None:
    # Given a target server that cannot reach the source (port 1), told a conninfo holding a password
    src, tgt = fresh_dbs
    for dsn in fresh_dbs:
        with closing(connect(dsn)) as conn:
            execute(conn, "CREATE TABLE public.orders (id bigint PRIMARY KEY, note text)")
    secret = "Pw-in-conninfo-7731"
    unreachable = f"host=127.0.0.1 port=1 dbname={parse_dsn(src)['dbname']} user=postgres password={secret}"
    plan = LogicalReplicationPlan(
        ReplicationNames("zdm_test"), (TableName("public", "orders"),), LogicalSettings(copy_method="subscription")
    )
    engine = LogicalEngine(src, tgt, plan, subscription_conninfo=unreachable)
    log = Path(pg_pair[1].directory) / "server.log"
    before = log.stat().st_size
    # When CREATE SUBSCRIPTION fails
    try:
        with pytest.raises(psycopg2.Error) as caught:
            engine.start()
        assert secret not in str(caught.value)
    finally:
        engine.teardown()
    # Then the server logged the error without the statement (it holds the connection string)
    written = log.read_bytes()[before:].decode(errors="replace")
    assert "could not connect" in written
    assert [line for line in written.splitlines() if secret in line] == []


def test_a_teardown_during_the_parallel_copy_is_not_undone_by_the_start_still_running(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a teardown (e.g. the alarm's rollback) that runs while a start is still copying
    src, tgt = fresh_dbs
    given_sample(src, tgt, 20_000)
    torn_down: list[object] = []

    def teardown_once(_: ChunkCopied) -> None:
        if not torn_down:
            torn_down.append(make_engine(src, tgt, copy_workers=1, copy_chunk_rows=2_000).teardown())

    engine = make_engine(src, tgt, on_copy_progress=teardown_once, copy_workers=1, copy_chunk_rows=2_000)
    # When the start reaches the end of its copy / Then it refuses to create the subscription
    with pytest.raises(ReplicationSetupError, match="was torn down while it ran: no subscription was created"):
        engine.start()
    # And nothing of the migration is left (once: an enabled subscription on a dropped slot, 'streaming')
    with closing(connect(src)) as source, closing(connect(tgt)) as target:
        assert fetch_value(target, "SELECT count(*) FROM pg_subscription WHERE subname = 'zdm_test'") == 0
        assert fetch_value(source, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'zdm_test'") == 0
        assert fetch_value(source, "SELECT count(*) FROM pg_publication WHERE pubname = 'zdm_test'") == 0
    engine.teardown()


def test_a_lost_slot_is_a_failed_phase_never_streaming() -> None:
    # Given a source that keeps at most 1 MB of WAL for a slot, and replication streaming
    with server_pair("lostslot", {"max_slot_wal_keep_size": "1MB"}) as (source_server, target_server):
        src, tgt = source_server.dsn(), target_server.dsn()
        for dsn in (src, tgt):
            with closing(connect(dsn)) as conn:
                execute(conn, "CREATE TABLE t (id bigint PRIMARY KEY, pad text)")
        plan = LogicalReplicationPlan(ReplicationNames("zdm_lost"), (TableName("public", "t"),), LogicalSettings())
        engine = LogicalEngine(src, tgt, plan)
        engine.start()
        wait_until(lambda: engine.status().phase is Phase.STREAMING, 30, "streaming")
        # When the subscription stops and the source writes more WAL than that
        engine.stop()
        wait_until(lambda: not engine.status().slot.active, 30, "the walsender to go")  # type: ignore[union-attr]
        with closing(connect(src)) as source:
            for _ in range(6):
                execute(source, "INSERT INTO t SELECT g, repeat('y', 1000) FROM generate_series(100000, 103000) g")
                execute(source, "DELETE FROM t WHERE id >= 100000")
                execute(source, "SELECT pg_switch_wal()")
                execute(source, "CHECKPOINT")
            assert (
                fetch_value(source, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'zdm_lost'")
                == "lost"
            )
        engine.start()
        # Then the phase is failed (the state machine's ReplicationBroken), never 'streaming'
        status = engine.status()
        assert status.slot is not None and status.slot.lost
        assert status.phase is Phase.FAILED
        engine.teardown()


def test_a_table_dropped_and_created_again_on_the_source_is_a_problem_not_silence(fresh_dbs: tuple[str, str]) -> None:
    # Given two tables streaming, one of them partitioned (its partition is published through the root)
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        run_sql(
            dsn,
            "CREATE TABLE daily_stats (id int PRIMARY KEY, n int);"
            " CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);"
            " CREATE TABLE m_1 PARTITION OF m FOR VALUES FROM (0) TO (100)",
        )
    run_sql(src, "INSERT INTO daily_stats VALUES (1, 1); INSERT INTO m VALUES (1)")
    tables = (TableName("public", "daily_stats"), TableName("public", "m"), TableName("public", "m_1"))
    engine = make_engine(src, tgt, tables=tables)
    try:
        engine.start()
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming without problems")

        # When a nightly job rebuilds daily_stats on the source (DROP, CREATE, fill)
        run_sql(
            src,
            "DROP TABLE daily_stats; CREATE TABLE daily_stats (id int PRIMARY KEY, n int);"
            " INSERT INTO daily_stats VALUES (1, 2)",
        )

        # Then the engine reports it (the cutover refuses and health gates fail on problems), while the
        # target silently keeps the old row: nothing replicates the new table
        (problem,) = engine.status().problems
        assert problem.startswith("public.daily_stats no longer in publication zdm_test")
        assert query(tgt, "SELECT n FROM daily_stats WHERE id = 1") == [(1,)]
    finally:
        engine.teardown()


def test_ddl_run_on_the_source_only_is_named_until_the_target_follows(fresh_dbs: tuple[str, str]) -> None:
    # Given a table streaming
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        run_sql(dsn, "CREATE TABLE orders (id int PRIMARY KEY, n int)")
    run_sql(src, "INSERT INTO orders VALUES (1, 1)")
    engine = make_engine(src, tgt, tables=[TableName("public", "orders")])
    try:
        engine.start()
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming without problems")

        # When a release adds a column on the source only and writes a row with it
        run_sql(src, "ALTER TABLE orders ADD COLUMN note text; INSERT INTO orders VALUES (2, 2, 'x')")

        # Then the status names the column and what to do, and the apply, failing on that row, counts its errors
        wait_until(lambda: "apply error" in " ".join(engine.status().problems), 30, "an apply error")
        problems = engine.status().problems
        assert any(
            p.startswith("the schemas no longer match: public.orders.note: missing on the target (source type text)")
            and "make the same change on the target" in p
            for p in problems
        ), problems
        assert query(tgt, "SELECT count(*) FROM orders") == [(1,)]

        # When the target follows, the problem clears and the row arrives
        run_sql(tgt, "ALTER TABLE orders ADD COLUMN note text")
        wait_until(lambda: query(tgt, "SELECT note FROM orders WHERE id = 2") == [("x",)], 60, "the row to arrive")
        wait_until(lambda: engine.status().problems == [], 30, "no problem")

        # When a column's type changes on the source only, it is named as well
        run_sql(src, "ALTER TABLE orders ALTER COLUMN n TYPE bigint")
        (problem,) = engine.status().problems
        assert "public.orders.n: type bigint on the source, integer on the target" in problem
    finally:
        engine.teardown()


def test_a_partition_created_on_the_source_after_the_start_is_named_with_the_statement_that_fixes_it(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a table partitioned by month the same way on both sides, streaming through its root
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        run_sql(
            dsn,
            "CREATE TABLE m (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);"
            " CREATE TABLE m_2026_11 PARTITION OF m FOR VALUES FROM ('2026-11-01') TO ('2026-12-01')",
        )
    run_sql(src, "INSERT INTO m VALUES (1, '2026-11-05')")
    tables = (TableName("public", "m"), TableName("public", "m_2026_11"))
    engine = make_engine(src, tgt, tables=tables)
    try:
        engine.start()
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming without problems")

        # When a scheduled job creates next month's partition on the source, and rows land in both months
        run_sql(
            src,
            "CREATE TABLE m_2026_12 PARTITION OF m FOR VALUES FROM ('2026-12-01') TO ('2027-01-01');"
            " INSERT INTO m VALUES (2, '2026-12-05'); INSERT INTO m VALUES (3, '2026-11-06')",
        )

        # Then the status names the partition and the statement that creates it on the target, while the
        # apply is stuck on the December row (and the November row behind it)
        (problem,) = [p for p in engine.status().problems if p.startswith("the schemas no longer match")]
        statement = (
            "CREATE TABLE public.m_2026_12 PARTITION OF public.m FOR VALUES FROM ('2026-12-01') TO ('2027-01-01')"
        )
        assert (
            f"public.m_2026_12: a partition of public.m on the source only (a row routed to it stops the apply): {statement}"
            in problem
        )
        assert query(tgt, "SELECT id FROM m ORDER BY 1") == [(1,)]

        # When the target runs that statement, the rows arrive and the problem clears
        run_sql(tgt, statement)
        wait_until(lambda: query(tgt, "SELECT id FROM m ORDER BY 1") == [(1,), (2,), (3,)], 60, "the rows to arrive")
        wait_until(lambda: engine.status().problems == [], 30, "no problem")
    finally:
        engine.teardown()


def test_a_long_lock_on_a_table_fails_the_start_naming_its_session_and_nothing_is_created(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a session holding a SHARE UPDATE EXCLUSIVE lock on a selected table, as a long CREATE INDEX
    # CONCURRENTLY, VACUUM or ANALYZE does
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        run_sql(dsn, "CREATE TABLE orders (id int PRIMARY KEY)")
    run_sql(src, "INSERT INTO orders VALUES (1)")
    holder = connect(src, application_name="nightly-reindex", autocommit=False)
    execute(holder, "LOCK TABLE orders IN SHARE UPDATE EXCLUSIVE MODE")
    engine = make_engine(src, tgt, tables=[TableName("public", "orders")], lock_wait_seconds=3)
    try:
        # When the engine starts / Then it gives up after the wait, naming the session; meanwhile the
        # application's writes went on (they never conflict with that lock)
        with pytest.raises(
            TableLocksBusy, match=r"creating publication zdm_test waited .* application nightly-reindex"
        ):
            engine.start()
        run_sql(src, "INSERT INTO orders VALUES (2)")
        # And nothing was created on either side
        assert query(src, "SELECT count(*) FROM pg_publication") == [(0,)]
        assert not slot_exists(src)
        assert query(tgt, "SELECT count(*) FROM pg_subscription") == [(0,)]

        # When the lock is released, the start succeeds
        holder.rollback()
        engine.start()
        wait_until(lambda: query(tgt, "SELECT id FROM orders ORDER BY 1") == [(1,), (2,)], 30, "the copy")
    finally:
        holder.close()
        engine.teardown()


def test_a_transaction_larger_than_the_decoding_memory_streams_to_the_target_instead_of_spilling_on_the_source(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a source whose walsender may hold only 64 kB of a transaction in memory, streaming to the target
    src, tgt = fresh_dbs
    run_sql(src, f"ALTER DATABASE \"{parse_dsn(src)['dbname']}\" SET logical_decoding_work_mem = '64kB'")
    for dsn in (src, tgt):
        run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    engine = make_engine(src, tgt, tables=[TableName("public", "t")])
    try:
        engine.start()
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming without problems")

        # When one transaction writes 100,000 rows (about 11 MB)
        run_sql(src, "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g")
        wait_until(lambda: query(tgt, "SELECT count(*) FROM t") == [(100_000,)], 60, "the rows")

        # Then it was streamed to the target while it ran (the walsender reports its statistics a little
        # later), and nothing was spilled to the source's disk
        slot_stats = "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = 'zdm_test'"
        wait_until(lambda: query(src, slot_stats)[0][1] > 10_000_000, 30, "the slot's statistics")
        assert query(src, slot_stats)[0][0] == 0
    finally:
        engine.teardown()


ORDERS, COUPONS = TableName("public", "orders"), TableName("public", "coupons")


def replicating_orders(src: str, tgt: str, rows: int = 0) -> tuple[LogicalEngine, LogicalEngine]:
    """orders (with `rows` rows) on both sides, replicated: the engine that started it, and the engine of a
    later invocation, which selects coupons too (the file's patterns match a table created since)."""
    for dsn in (src, tgt):
        run_sql(dsn, "CREATE TABLE orders (id int PRIMARY KEY, v text)")
    run_sql(src, "INSERT INTO orders SELECT g, 'x' FROM generate_series(1, %s) g", (rows,))
    engine = make_engine(src, tgt, tables=[ORDERS])
    engine.start()
    return engine, make_engine(src, tgt, tables=[COUPONS, ORDERS])


def test_a_table_created_on_the_source_after_the_start_is_named_then_added_and_replicated_whole(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a running replication of orders
    src, tgt = fresh_dbs
    engine, later = replicating_orders(src, tgt, rows=1000)
    try:
        wait_until(lambda: streaming_without_problems(engine), 30, "streaming without problems")
        # When the application's release creates a table on the source only and writes to it
        run_sql(src, "CREATE TABLE coupons (code text PRIMARY KEY, pct int)")
        run_sql(src, "INSERT INTO coupons SELECT 'c' || g, g % 100 FROM generate_series(1, 5000) g")
        # Then the status names it and says what to do first; it cannot be added yet, and nothing changes
        status = later.status()
        text = " ".join(status.problems)
        assert "public.coupons: created on the source after the start, not replicated yet" in text, text
        assert "first create public.coupons on the target as on the source" in text, text
        assert "no longer in publication" not in text  # not a table dropped and created again
        assert status.tables_to_add == []
        assert later.add_tables() == AddedTables([], ["public.coupons"])
        # When it is created on the target alike, and the engine adds it (a retried task: twice)
        run_sql(tgt, "CREATE TABLE coupons (code text PRIMARY KEY, pct int)")
        assert later.status().tables_to_add == ["public.coupons"]
        assert later.add_tables() == AddedTables(["public.coupons"], [])
        assert later.add_tables() == AddedTables([], [])
        run_sql(src, "UPDATE coupons SET pct = pct + 1 WHERE pct < 10")
        run_sql(src, "INSERT INTO coupons VALUES ('late', 5)")
        run_sql(src, "INSERT INTO orders VALUES (1001, 'after')")
        # Then its rows are copied and its changes follow; no problem is left
        wait_until(lambda: streaming_without_problems(later), 60, "the new table copied and streaming")
        caught_up(later, src, tgt)
        diffs = [d for d in compare_databases(src, tgt, [COUPONS, ORDERS]) if not d.equal]
        assert diffs == [], diffs
        assert query(tgt, "SELECT count(*) FROM coupons") == [(5001,)]
    finally:
        later.teardown()


def test_tables_are_not_added_to_a_target_table_holding_rows_nor_to_one_defined_otherwise(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a running replication, and a table created after the start on both sides, but not alike
    src, tgt = fresh_dbs
    _, later = replicating_orders(src, tgt)
    try:
        run_sql(src, "CREATE TABLE coupons (code text PRIMARY KEY, pct int)")
        run_sql(tgt, "CREATE TABLE coupons (code text PRIMARY KEY)")
        # When the status reads it / Then it is not offered for adding, and says what must change first
        status = later.status()
        assert status.tables_to_add == []
        assert any("public.coupons must first be alike on both sides" in p for p in status.problems), status.problems
        # When the engine is asked to add it anyway / Then it refuses, naming the difference; nothing was added
        with pytest.raises(
            ReplicationSetupError, match=r"public.coupons.pct: missing on the target.*nothing was added"
        ):
            later.add_tables()
        assert query(src, "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'coupons'") == [(0,)]
        # When it is alike but already holds rows on the target / Then it refuses too (the copy would duplicate)
        run_sql(tgt, "ALTER TABLE coupons ADD COLUMN pct int")
        run_sql(tgt, "INSERT INTO coupons VALUES ('stray', 1)")
        assert later.status().tables_to_add == []
        with pytest.raises(ReplicationSetupError, match=r"target tables already hold rows: public.coupons"):
            later.add_tables()
        assert query(src, "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'coupons'") == [(0,)]
    finally:
        later.teardown()
