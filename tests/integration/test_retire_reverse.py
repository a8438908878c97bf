"""Retiring the reverse replication after the rollback window, against real servers and pgbouncer.

After a cutover the target's writes flow back to the source (subscription `zdm_shop_rev` on the
source, slot and publication on the target). `retire_reverse` waits until the source has applied
the target's writes up to the target's position, then drops all three; from then on a rollback
is refused, since it could no longer bring the target's writes back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import replace

import pytest
from cutover_env import REVERSE, Shop, assert_no_difference, read_only_error, shop_in, until
from psycopg2 import sql

from lambdas.core.config import LogicalSettings
from lambdas.core.cutover import (
    CutoverError,
    CutoverRunner,
    Hooks,
    Operation,
    OperationBusy,
    RollbackError,
    RollbackReadiness,
    Status,
    Step,
    store,
)
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.fence import make_writable
from lambdas.core.lsn import Lsn
from lambdas.core.routers.base import Side
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload
from tests.integration.db_env import run_sql


@pytest.fixture
def shop(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    with shop_in(pg_pair, fresh_dbs) as s:
        yield s


class SimulatedCrash(BaseException):
    """Stands for the process dying (a Lambda timeout): nothing catches it, nothing is undone."""


def cut_over_under_writes(shop: Shop, seconds: float = 1.0) -> None:
    """A cutover done while clients write, then the clients writing to the target for a while, then stopped."""
    workload = Workload(shop.app, clients=4, rate=60).start()
    time.sleep(0.5)
    shop.runner().cutover()
    time.sleep(seconds)
    stats = workload.stop()
    assert stats.failed == 0, stats.errors


def reverse_objects(shop: Shop) -> list[str]:
    """What of the reverse replication exists: subscription on the source, slot and publication on the target."""
    found: list[str] = []
    for dsn, kind, query in (
        (shop.src, "subscription", "SELECT count(*) FROM pg_subscription WHERE subname = %s"),
        (shop.tgt, "slot", "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s"),
        (shop.tgt, "publication", "SELECT count(*) FROM pg_publication WHERE pubname = %s"),
    ):
        conn = connect(dsn)
        try:
            if fetch_value(conn, query, (REVERSE.base,)):
                found.append(kind)
        finally:
            conn.close()
    return found


def customers_named(dsn: str, email: str) -> int:
    conn = connect(dsn)
    try:
        return int(fetch_value(conn, "SELECT count(*) FROM customers WHERE email = %s", (email,)))
    finally:
        conn.close()


def write_customer(shop: Shop, email: str, name: str) -> None:
    """A write through the application's alias (the writer: the target, after a cutover)."""
    conn = connect(shop.app)
    try:
        execute(conn, "INSERT INTO customers (email, name) VALUES (%s, %s)", (email, name))
    finally:
        conn.close()


def hold_table_on_source(shop: Shop, table: str, seconds: float) -> threading.Thread:
    """Keep the reverse apply worker from writing to `table` for `seconds` (a SHARE lock: reads go on)."""
    conn = connect(shop.src)
    make_writable(conn)  # the source is fenced: our session may still take the lock
    execute(conn, "BEGIN")
    execute(conn, sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(table)))

    def release() -> None:
        time.sleep(seconds)
        execute(conn, "ROLLBACK")
        conn.close()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def recorded(shop: Shop) -> list[tuple[str, str]]:
    conn = connect(shop.tgt)
    try:
        return [(h["operation"], h["step"]) for h in store.history(conn, "shop")]
    finally:
        conn.close()


def test_retire_waits_until_the_source_has_the_target_s_last_write_then_drops_the_reverse_replication(
    shop: Shop,
) -> None:
    # Given a cutover done under writes, and the reverse apply worker held up on the source
    cut_over_under_writes(shop)
    assert reverse_objects(shop) == ["subscription", "slot", "publication"]
    holder = hold_table_on_source(shop, "customers", 1.5)
    # And a row written on the target (through the application's alias) just before the retire
    write_customer(shop, "last@example.com", "Last Write")
    assert customers_named(shop.src, "last@example.com") == 0  # not applied yet: the lock holds it
    # When the reverse replication is retired
    result = shop.runner().retire_reverse()
    holder.join()
    # Then it waited for the source to apply the target's writes, and only then dropped everything
    assert result.status == "done" and result.operation == "retire_reverse"
    assert [s.step for s in result.steps] == ["catch_up", "retire_replication"]
    caught_up = result.steps[0].detail
    assert caught_up["waited_seconds"] >= 0.5, caught_up
    assert Lsn.parse(caught_up["reached"]) >= Lsn.parse(caught_up["position"])
    assert sorted(result.steps[1].detail["removed"]) == sorted(
        [f"subscription {REVERSE.subscription}", f"slot {REVERSE.slot}", f"publication {REVERSE.publication}"]
    )
    assert customers_named(shop.src, "last@example.com") == 1
    assert reverse_objects(shop) == []
    # And the source is the target row for row, as of the retire
    assert assert_no_difference(shop.diffs()) > 5_000
    # And the writer stays on the target, the source stays read-only
    assert shop.router.state().writer is Side.TARGET
    assert read_only_error(shop.src) == "ReadOnlySqlTransaction"
    assert read_only_error(shop.tgt) is None


def test_retire_is_safe_to_run_again_after_it_finished_or_died_between_its_steps(shop: Shop) -> None:
    # Given a cutover done, and a retire that dies right after recording that the source caught up
    cut_over_under_writes(shop, seconds=0.5)

    def die(operation: Operation, step: Step) -> None:
        if operation is Operation.RETIRE_REVERSE and step is Step.CATCH_UP:
            raise SimulatedCrash(step.value)

    with pytest.raises(SimulatedCrash):
        shop.runner(Hooks(after_record=die)).retire_reverse()
    assert reverse_objects(shop) == ["subscription", "slot", "publication"]
    # When it runs again, and once more after that
    resumed = shop.runner().retire_reverse()
    again = shop.runner().retire_reverse()
    # Then the second run only dropped (the catch-up was recorded), the third changed nothing
    assert [s.step for s in resumed.steps] == ["retire_replication"] and resumed.attempt == 1
    assert again.status == "already_done" and again.steps == [] and again.attempt == 1
    assert reverse_objects(shop) == []
    # And each retire step is recorded once, after the cutover's
    retire_steps = [step for op, step in recorded(shop) if op == "retire_reverse"]
    assert retire_steps == ["catch_up", "retire_replication"]
    conn = connect(shop.tgt)
    try:
        progress = store.load(conn, "shop", Operation.RETIRE_REVERSE)
    finally:
        conn.close()
    assert progress is not None and progress.status is Status.DONE


def test_a_rollback_after_the_retire_is_refused_and_changes_nothing(shop: Shop) -> None:
    # Given a cutover done, and its reverse replication retired
    cut_over_under_writes(shop, seconds=0.5)
    shop.runner().retire_reverse()
    history = recorded(shop)
    # When a rollback is asked for (an alarm long after the window, say)
    with pytest.raises(RollbackError, match="retired after the rollback window") as caught:
        shop.runner().rollback()
    # Then the message says why: the target's writes since could not be brought back
    assert "would lose every write made on the target" in str(caught.value)
    assert "Nothing was changed" in str(caught.value)
    # And nothing changed: writer and reads on the target, the source read-only, the target writable,
    # no replication in either direction, no rollback recorded
    state = shop.router.state()
    assert (state.writer, state.read_weight, state.holding) == (Side.TARGET, 100, False)
    assert read_only_error(shop.src) == "ReadOnlySqlTransaction"
    assert read_only_error(shop.tgt) is None
    assert reverse_objects(shop) == []
    assert recorded(shop) == history
    conn = connect(shop.tgt)
    try:
        assert store.load(conn, "shop", Operation.ROLLBACK) is None
    finally:
        conn.close()


def test_a_rollback_asked_for_while_the_retire_runs_waits_for_it_then_is_refused_saying_why(shop: Shop) -> None:
    # Given a cutover done, and a retire held up (the source may not apply the target's last write yet)
    cut_over_under_writes(shop, seconds=0.5)
    holder = hold_table_on_source(shop, "customers", 2.0)
    write_customer(shop, "late@example.com", "Late Write")
    retire: dict[str, object] = {}
    retiring = threading.Thread(target=lambda: retire.update(result=shop.runner().retire_reverse()))
    retiring.start()
    time.sleep(0.5)  # the retire holds the lock and waits for the source
    # When an alarm's rollback arrives meanwhile
    started = time.monotonic()
    with pytest.raises(RollbackError, match="retired after the rollback window") as caught:
        shop.runner().rollback()
    waited = time.monotonic() - started
    retiring.join()
    holder.join()
    # Then it waited for the retire (it did not fail on the lock) and says why it cannot roll back now
    assert waited >= 0.8, waited
    assert "another cutover" not in str(caught.value)
    assert retire["result"].status == "done"  # type: ignore[attr-defined]
    # And nothing was rolled back: the writer stays on the target, the late write reached the source
    assert shop.router.state().writer is Side.TARGET
    assert customers_named(shop.src, "late@example.com") == 1
    conn = connect(shop.tgt)
    try:
        assert store.load(conn, "shop", Operation.ROLLBACK) is None
    finally:
        conn.close()


def test_a_rollback_that_cannot_get_the_lock_in_time_changes_nothing_and_says_so(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a cutover done, and another session holding the migration's lock on the target (an invocation
    # the alarm's stop did not end)
    cut_over_under_writes(shop, seconds=0.3)
    holder = connect(shop.tgt)
    assert store.try_lock(holder, "shop")
    monkeypatch.setattr("lambdas.core.cutover.runner.ROLLBACK_LOCK_WAIT_SECONDS", 0.5)
    try:
        # When a rollback is asked for / Then it waits its time, gives up and says what to do, as
        # OperationBusy: the state machine's Rollback task retries that error
        started = time.monotonic()
        with pytest.raises(OperationBusy, match=r"has been running for more than 0\.5 s") as caught:
            shop.runner().rollback()
        assert time.monotonic() - started >= 0.45
        assert "nothing was changed" in str(caught.value)
    finally:
        holder.close()
    # And nothing changed; with the lock free the rollback runs
    assert shop.router.state().writer is Side.TARGET
    result = shop.runner().rollback()
    assert result.status == "done" and shop.router.state().writer is Side.SOURCE


def test_retire_is_refused_before_a_cutover_and_after_a_rollback(shop: Shop) -> None:
    # Given no cutover yet / Then there is no reverse replication to retire
    with pytest.raises(CutoverError, match=r"cannot be retired: its cutover is not done \(never started\)"):
        shop.runner().retire_reverse()
    # Given a cutover rolled back within the window / Then the rollback already dropped it
    shop.runner().cutover()
    shop.runner().rollback()
    with pytest.raises(CutoverError, match="cannot be retired: it was rolled back after its cutover"):
        shop.runner().retire_reverse()
    conn = connect(shop.tgt)
    try:
        assert store.load(conn, "shop", Operation.RETIRE_REVERSE) is None
    finally:
        conn.close()


def readiness(shop: Shop) -> RollbackReadiness:
    return shop.runner().rollback_readiness()


def add_gift_note(dsn: str) -> None:
    conn = connect(dsn)
    make_writable(conn)  # the source is fenced after the cutover: DDL from our session still runs
    try:
        execute(conn, "ALTER TABLE customers ADD COLUMN gift_note text")
    finally:
        conn.close()


def test_the_rollback_window_sees_ddl_on_the_target_break_the_back_replication_and_a_fix_on_the_source_mend_it(
    shop: Shop,
) -> None:
    # Given no cutover yet: there is no rollback window to watch
    assert readiness(shop) == RollbackReadiness(applies=False)
    # And then a cutover done under writes: the back replication carries a rollback
    cut_over_under_writes(shop, seconds=0.5)
    until(lambda: readiness(shop).ready, 30, "the back replication streaming without problems")
    # When the application's next release adds a column on the new writer (the target) and writes it
    add_gift_note(shop.tgt)
    run_sql(shop.app, "INSERT INTO customers (email, name, gift_note) VALUES ('gift@example.com', 'G', 'ribbon')")
    # Then the window's check says a rollback would not run, naming the column, the side and the fix
    broken = readiness(shop)
    assert broken.applies and not broken.ready
    text = " ".join(broken.problems)
    assert "public.customers.gift_note: missing on the source (target type text)" in text, text
    assert "make the same change on the source as on the target" in text, text
    assert customers_named(shop.src, "gift@example.com") == 0
    # When the same column is added on the source
    add_gift_note(shop.src)
    # Then the back replication applies the row and a rollback is ready again
    until(lambda: customers_named(shop.src, "gift@example.com") == 1, 30, "the row applied on the source")
    until(lambda: readiness(shop).ready, 30, "the back replication without problems")
    # And a rollback now brings every target write back
    shop.runner().rollback()
    assert shop.router.state().writer is Side.SOURCE
    assert customers_named(shop.src, "gift@example.com") == 1
    # And once rolled back, there is no window left to watch
    assert readiness(shop) == RollbackReadiness(applies=False)


def test_after_the_retire_there_is_no_rollback_window_to_watch(shop: Shop) -> None:
    # Given a cutover whose back replication was retired
    cut_over_under_writes(shop, seconds=0.5)
    shop.runner().retire_reverse()
    # When the window's check runs (a gate retried after the retire, say)
    # Then it reports nothing to watch, rather than a broken back replication
    assert readiness(shop) == RollbackReadiness(applies=False)


def test_a_table_created_on_the_target_in_the_window_breaks_a_rollback_until_the_source_has_it_then_it_is_added(
    shop: Shop,
) -> None:
    # Given a cutover done under writes, the runner selecting tables with the file's patterns
    cut_over_under_writes(shop, seconds=0.5)
    quick_locks = LogicalSettings(copy_workers=2, copy_chunk_rows=5000, lock_wait_seconds=3)
    runner = CutoverRunner(
        shop.src,
        shop.tgt,
        shop.router,
        replace(shop.plan(quick_locks), patterns=(("public.*",), ("public.*_archive",))),
    )
    until(lambda: runner.rollback_readiness().ready, 30, "the back replication streaming without problems")
    # When the application's next release creates a table on the new writer and writes to it
    run_sql(shop.app, "CREATE TABLE coupons (code text PRIMARY KEY, percent int)")
    run_sql(shop.app, "INSERT INTO coupons SELECT 'c' || g, g % 40 FROM generate_series(1, 300) g")
    # Then a rollback would lose it: the window's check says so, and what to do first
    broken = runner.rollback_readiness(add_new_tables=True)
    assert broken.applies and not broken.ready
    text = " ".join(broken.problems)
    assert "public.coupons: created on the target after the start, not replicated yet" in text, text
    assert "first create public.coupons on the source as on the target" in text, text
    # When the table is created on the source, but without one of its columns, and the window checks again
    source = connect(shop.src)
    make_writable(source)  # the source is fenced after the cutover
    holder = connect(shop.tgt, application_name="nightly-vacuum", autocommit=False)
    try:
        execute(source, "CREATE TABLE coupons (code text PRIMARY KEY)")
        # Then it is not added, and the check says what must change first
        refused = " ".join(runner.rollback_readiness(add_new_tables=True).problems)
        assert "public.coupons must first be alike on both sides" in refused, refused
        assert "public.coupons.percent: missing on the source" in refused, refused
        # When the source's table is made alike, but a session holds a lock on the target's table
        execute(source, "ALTER TABLE coupons ADD COLUMN percent int")
        execute(holder, "LOCK TABLE coupons IN SHARE UPDATE EXCLUSIVE MODE")
        # Then the add gives up after its wait and the check reports it, rather than failing (a failed gate
        # would roll back)
        waited = runner.rollback_readiness(add_new_tables=True)
        assert not waited.ready
        assert any(p.startswith("adding public.coupons to it:") and "nightly-vacuum" in p for p in waited.problems), (
            waited.problems
        )
        # When the lock is released / Then the next check adds it
        holder.rollback()
    finally:
        holder.close()
        source.close()
    runner.rollback_readiness(add_new_tables=True)
    # Then it was added to the back replication: its rows reach the source, and a rollback is ready again
    until(lambda: runner.rollback_readiness().ready, 30, "the new table copied back")
    with closing(connect(shop.src)) as conn:
        assert fetch_value(conn, "SELECT count(*) FROM coupons") == 300
    # And a rollback now keeps it whole on the source
    runner.rollback()
    assert shop.router.state().writer is Side.SOURCE
    with closing(connect(shop.src)) as conn:
        assert fetch_value(conn, "SELECT count(*) FROM coupons") == 300
