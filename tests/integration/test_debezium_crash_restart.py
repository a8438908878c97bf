"""The debezium engine killed midway: its start or teardown (then the migration run again: the new run never
replays an earlier run's events, nor is reported copied before its own snapshot arrived), and its connector
during the snapshot (the snapshot taken again must not leave rows the source deleted meanwhile)."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from lambdas.core.changestream import state
from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_value
from lambdas.core.engines.debezium import DebeziumEngine
from lambdas.core.tables import TableName
from rehearsal.broker import Broker
from rehearsal.changestream import LocalChangeStream, standalone_engine
from rehearsal.compare import compare_databases
from tests.integration.stream_env import running, wait_until
from tests.integration.test_debezium_stream import TABLES, assert_converged, fence, given_sample, make_engine


def first_names(tgt: str) -> set[str]:
    with closing(connect(tgt)) as target:
        return {r[0] for r in fetch_all(target, "SELECT DISTINCT name FROM customers WHERE id <= 20")}


def test_a_start_killed_before_seeding_offsets_does_not_replay_an_earlier_runs_events_when_run_again(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first run of the migration that streamed changes, then was torn down (its topics keep its events)
    src, tgt = fresh_dbs
    given_sample(src, tgt, 1_000)
    first = make_engine(src, tgt, broker, tmp_path / "first", TABLES, name="dbz-crash-seed")
    with running(first):
        first.start()
        wait_until(lambda: first.status().copy_done, 120, "the first snapshot", first)
        with closing(connect(src)) as source:
            execute(source, "UPDATE customers SET name = 'first run' WHERE id <= 20")
        fence(first, src)
    # And the target emptied and the source changed, for a second run under the same name
    with closing(connect(src)) as source, closing(connect(tgt)) as target:
        for table in reversed(TABLES):
            execute(target, f"TRUNCATE {table} CASCADE")
        execute(source, "UPDATE customers SET name = 'second run' WHERE id <= 20")
    rerun = make_engine(src, tgt, broker, tmp_path / "second", TABLES, name="dbz-crash-seed")

    # When its start dies right after creating the state tables, before seeding the offsets (a Lambda
    # timeout, or the connection dropped: OperationalError is retried by the state machine)
    def die(*args: object, **kwargs: object) -> None:
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as m:
        m.setattr(state, "seed_offsets", die)
        with pytest.raises(psycopg2.OperationalError):
            rerun.start()
    # And the start is invoked again
    with running(rerun):
        rerun.start()
        wait_until(lambda: rerun.status().copy_done, 120, "the second snapshot", rerun)
        # Then the target gets this run's rows, not the first run's stream replayed over them
        wait_until(lambda: first_names(tgt) == {"second run"}, 60, f"this run's names (has {first_names(tgt)})")
        fence(rerun, src)
        assert_converged(src, tgt)


def test_a_new_run_after_a_teardown_killed_midway_is_not_reported_copied_before_its_snapshot_arrives(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a first run that completed its snapshot and streamed
    src, tgt = fresh_dbs
    given_sample(src, tgt, 1_000)
    first = make_engine(src, tgt, broker, tmp_path / "first", TABLES, name="dbz-crash-teardown")
    first.start()
    wait_until(lambda: first.status().copy_done, 120, "the first snapshot", first)
    fence(first, src)

    # When its teardown dies right after dropping the first of its state tables on the target
    def drop_first_then_die(conn: psycopg2.extensions.connection, keep: object = ()) -> list[str]:
        execute(conn, sql.SQL("DROP TABLE {}").format(sql.Identifier(state.SCHEMA, state.STATE_TABLES[0])))
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    with monkeypatch.context() as m:
        m.setattr(state, "drop_state_tables", drop_first_then_die)
        with pytest.raises(psycopg2.OperationalError):
            first.teardown()
    # And the migration is run again under the same name, onto the emptied target
    with closing(connect(tgt)) as target:
        for table in reversed(TABLES):
            execute(target, f"TRUNCATE {table} CASCADE")
    rerun = make_engine(src, tgt, broker, tmp_path / "second", TABLES, name="dbz-crash-teardown")
    with running(rerun):
        rerun.start()
        status = rerun.status()  # at once: the connector is still starting, nothing of this run is applied
        with closing(connect(tgt)) as target:
            rows = fetch_value(target, "SELECT count(*) FROM customers")
        # Then the new run is not reported copied and streaming while its target is still empty
        assert rows == 0
        assert (status.phase.value, status.copy_done) == ("copying", False), status


def test_offsets_seeded_is_true_for_a_control_row_an_earlier_version_made_and_false_for_a_new_one(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a target whose stream state an earlier version made (no offsets_seeded column: its start had seeded)
    old, new = fresh_dbs
    with closing(connect(old)) as conn:
        execute(conn, "CREATE SCHEMA _zdm")
        execute(
            conn,
            "CREATE TABLE _zdm.dbz_control (id int PRIMARY KEY CHECK (id = 1), applier_paused boolean NOT NULL DEFAULT false)",
        )
        execute(conn, "INSERT INTO _zdm.dbz_control (id) VALUES (1)")
        # When this version ensures its state tables (twice: idempotent)
        state.ensure_state_tables(conn)
        state.ensure_state_tables(conn)
        # Then that stream counts as seeded (not restarted from scratch), and new rows default to not seeded
        assert state.offsets_seeded(conn)
        assert (
            fetch_value(
                conn,
                "SELECT column_default FROM information_schema.columns WHERE table_name = 'dbz_control' AND column_name = 'offsets_seeded'",
            )
            == "false"
        )
    # And on a new target nothing is seeded until the first start seeds, in one transaction with the mark
    with closing(connect(new)) as conn:
        assert not state.offsets_seeded(conn)
        state.ensure_state_tables(conn)
        assert not state.offsets_seeded(conn)
        state.seed_offsets_once(conn, {("t", 0): 5})
        assert state.offsets_seeded(conn)
        assert state.stored_offsets(conn, ["t"]) == {("t", 0): 5}


ITEMS = TableName("public", "items")
SMALL = TableName("public", "a_small")


def _local(engine: DebeziumEngine) -> LocalChangeStream:
    runtime = engine.runtime
    assert isinstance(runtime, LocalChangeStream)
    return runtime


def _applied_rows(tgt: str, table: str = "items") -> int:
    target = connect(tgt)
    try:
        return int(fetch_value(target, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))))
    finally:
        target.close()


def given_items_and_a_small_table(src: str, tgt: str, items: int, pad: str) -> tuple[Connection, Connection]:
    """`items` rows in items (each with `pad`) and 50 in a_small on the source, both tables empty on the
    target: (source, target) connections, the caller's to close."""
    ddl = "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, pad text); CREATE TABLE a_small (id int PRIMARY KEY)"
    source, target = connect(src), connect(tgt)
    execute(source, ddl)
    execute(target, ddl)
    execute(source, "INSERT INTO items SELECT g, 0, %s FROM generate_series(1, %s) g", (pad, items))
    execute(source, "INSERT INTO a_small SELECT generate_series(1, 50)")
    return source, target


def test_connector_killed_during_its_snapshot_leaves_no_row_deleted_meanwhile(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a source table large enough that the snapshot takes several seconds, a small one the
    # connector snapshots before it, and an empty target
    src, tgt = fresh_dbs
    source, target = given_items_and_a_small_table(src, tgt, 150_000, "x" * 200)
    engine = make_engine(src, tgt, broker, tmp_path / "stream", [SMALL, ITEMS], name="dbz-audit-snap")
    runtime = _local(engine)
    with running(engine):
        engine.start()
        # When the connector is killed (SIGKILL) while its snapshot is being applied, the small table's already
        wait_until(lambda: _applied_rows(tgt) >= 20_000, 120, "part of the snapshot on the target", engine)
        wait_until(lambda: _applied_rows(tgt, "a_small") == 50, 60, "the small table on the target", engine)
        connector = runtime.process("connector")
        assert connector is not None
        connector.kill()
        # And, while it is down, the source deletes and updates rows the target already holds, and empties
        # the small table (the snapshot taken again has no read of it at all)
        execute(source, "DELETE FROM items WHERE id <= 1000")
        execute(source, "UPDATE items SET v = v + 1 WHERE id BETWEEN 1001 AND 2000")
        execute(source, "DELETE FROM a_small")
        engine.start()  # the connector again
        wait_until(lambda: engine.status().copy_done, 240, "the snapshot to be applied", engine)
        execute(source, "UPDATE items SET v = v + 10 WHERE id = 150000")
        engine.catch_up(60)

        # Then the target equals the source: no row the source deleted meanwhile stays on the target
        diffs = [d for d in compare_databases(src, tgt, [SMALL, ITEMS]) if not d.equal]
        extra = fetch_value(target, "SELECT count(*) FROM items WHERE id <= 1000")
        assert extra == 0 and diffs == [], (extra, diffs)
        assert _applied_rows(tgt, "a_small") == 0
        assert engine.status().dead_letters == 0
    source.close()
    target.close()


def test_connector_killed_after_streaming_began_but_before_storing_offsets_loses_no_change(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a connector that stores its offsets once a minute (as MSK Connect's workers do), whose snapshot
    # was applied and whose first streamed changes (to both tables) were applied too
    src, tgt = fresh_dbs
    source, target = given_items_and_a_small_table(src, tgt, 5_000, "x")
    engine = standalone_engine(
        "dbz-audit-flush",
        src,
        tgt,
        broker.bootstrap,
        tmp_path / "stream",
        [SMALL, ITEMS],
        debezium={"heartbeat_interval_ms": 1000},
        batch_size=500,
        batch_window_seconds=0.1,
        offset_flush_ms=60_000,
    )
    runtime = _local(engine)
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        execute(source, "UPDATE items SET v = 1 WHERE id <= 100")
        execute(source, "INSERT INTO a_small VALUES (51)")  # the small table streams too
        engine.catch_up(60)
        # When the connector is killed (SIGKILL) before it stored an offset past its snapshot
        connector = runtime.process("connector")
        assert connector is not None
        connector.kill()
        # (the embedded engine stores one at the snapshot's end; a Kafka Connect worker flushes on its interval only)
        for offsets in (tmp_path / "stream").rglob("offsets.dat"):
            offsets.unlink()
        # And, while it is down, the source deletes, updates and inserts rows, and empties the small table
        execute(source, "UPDATE items SET v = 5 WHERE id <= 50")  # over changes streamed before the kill
        execute(source, "DELETE FROM items WHERE id BETWEEN 101 AND 200")
        execute(source, "UPDATE items SET v = 2 WHERE id BETWEEN 201 AND 300")
        execute(source, "INSERT INTO items SELECT g, 3, 'y' FROM generate_series(6001, 6100) g")
        execute(source, "DELETE FROM a_small")
        engine.start()  # the connector again
        execute(source, "UPDATE items SET v = 4 WHERE id = 5000")
        wait_until(
            lambda: fetch_value(target, "SELECT v FROM items WHERE id = 5000") == 4, 120, "the change after restart"
        )
        engine.catch_up(60)

        # Then the target equals the source: nothing changed while the connector was down is lost
        diffs = [d for d in compare_databases(src, tgt, [SMALL, ITEMS]) if not d.equal]
        assert diffs == [], diffs
        assert engine.status().dead_letters == 0
    source.close()
    target.close()
