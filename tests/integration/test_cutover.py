"""Cutover and rollback against two real PostgreSQL servers and a real pgbouncer, under writes.

The application is a write workload connected to pgbouncer's alias `app` (16 clients, about
1000 transactions a second). "Lost" is checked row for row with rehearsal.compare: either
both databases at one instant (repeatable-read snapshots taken while clients are held), or
after the back replication has caught up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import psycopg2
import pytest
from cutover_env import (
    TABLES,
    Shop,
    assert_no_difference,
    longest_gap,
    percentile,
    read_only_error,
    server_port,
    shop_in,
    until,
)
from psycopg2 import sql

from lambdas.core.config import LogicalSettings
from lambdas.core.cutover import (
    CutoverAborted,
    CutoverError,
    CutoverNotReady,
    CutoverRunner,
    Hooks,
    Operation,
    Status,
    Step,
    store,
)
from lambdas.core.cutover.readshift import shift_reads
from lambdas.core.cutover.steps import CUTOVER_STEPS
from lambdas.core.db import DatabaseUnreachable, connect, execute, fetch_value
from lambdas.core.engines.table_locks import TableLocksBusy
from lambdas.core.fence import is_fenced, lift_fence
from lambdas.core.preflight.facts import replication_left
from lambdas.core.routers.base import Side
from rehearsal.compare import Snapshot
from rehearsal.losses import missing_orders
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload, WorkloadStats

CLIENTS = 16
RATE_PER_CLIENT = 65.0  # about 1000 transactions a second in all


@pytest.fixture
def shop(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    with shop_in(pg_pair, fresh_dbs) as s:
        yield s


def run_workload(dsn: str, clients: int = CLIENTS, rate: float = RATE_PER_CLIENT) -> Workload:
    return Workload(dsn, clients=clients, rate=rate).start()


def max_id(dsn: str, table: str = "orders") -> int:
    conn = connect(dsn)
    try:
        return int(fetch_value(conn, sql.SQL("SELECT coalesce(max(id), 0) FROM {}").format(sql.Identifier(table))))
    finally:
        conn.close()


def assert_no_failures(stats: WorkloadStats, seconds: float, min_tps: float = 0.0) -> None:
    assert stats.failed == 0, stats.errors
    assert stats.committed > 0
    assert stats.committed / seconds > min_tps, f"only {stats.committed} transactions in {seconds:.1f}s"


def test_cutover_under_write_load_fails_no_transaction_and_loses_no_row(shop: Shop) -> None:
    # Given 16 clients writing through pgbouncer to the source, replicated to the target
    snapshots: dict[str, Snapshot] = {}

    def at_switch(operation: Operation, step: Step) -> None:
        if step is Step.SWITCH_WRITER:  # clients are still held: both sides stand still
            snapshots["switch"] = Snapshot.take(shop.src, shop.tgt)

    workload = run_workload(shop.app)
    started = time.monotonic()
    time.sleep(1.5)
    # When the cutover runs while they write, and they go on writing for a while
    result = shop.runner(Hooks(after_record=at_switch)).cutover()
    orders_at_switch = max_id(shop.src)
    time.sleep(1.5)
    stats = workload.stop()
    seconds = time.monotonic() - started
    # Then no transaction failed (at about 1000 a second), and the longest write pause is short
    assert_no_failures(stats, seconds, min_tps=600)
    pause = longest_gap(stats)
    print(
        f"\ncutover under {stats.committed / seconds:.0f} tps: longest write pause {pause * 1000:.0f} ms, "
        f"max latency {stats.max_latency * 1000:.0f} ms, p99 {percentile(stats, 0.99) * 1000:.1f} ms, "
        f"fence to release {result.pause_seconds * 1000 if result.pause_seconds else -1:.0f} ms"
    )
    assert result.status == "done" and result.pause_seconds is not None
    assert stats.max_latency < 2.0 and result.pause_seconds < 2.0
    assert [s.step for s in result.steps] == [s.value for s in CUTOVER_STEPS]
    # And at the switch both databases held exactly the same rows
    compared = assert_no_difference(snapshots["switch"].diffs(TABLES))
    assert compared > 5_000
    # And the writes after it went to the target and came back to the source by the back replication
    assert max_id(shop.tgt) > orders_at_switch
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
    # And the router points the writer and all reads at the target; the source stays read-only
    state = shop.router.state()
    assert (state.writer, state.read_weight, state.holding) == (Side.TARGET, 100, False)
    assert server_port(shop.app) == shop.target.port
    assert read_only_error(shop.src) == "ReadOnlySqlTransaction"
    # And new orders on the target take ids beyond every id the source handed out
    conn = connect(shop.app)
    try:
        new_id = fetch_value(conn, "INSERT INTO orders (customer_id) VALUES (1) RETURNING id")
    finally:
        conn.close()
    assert new_id > orders_at_switch
    # And running it again changes nothing
    again = shop.runner().cutover()
    assert again.status == "already_done" and again.fence_lsn == result.fence_lsn


def test_rollback_after_cutover_brings_every_target_write_back_to_the_source(shop: Shop) -> None:
    # Given a cutover done under writes, and the application writing to the target since
    workload = run_workload(shop.app)
    started = time.monotonic()
    time.sleep(1.0)
    shop.runner().cutover()
    time.sleep(1.5)
    # (the source first: the back replication brings the target's new orders to it between the two reads)
    source_orders = max_id(shop.src)
    target_orders = max_id(shop.tgt)
    assert target_orders >= source_orders  # the target took new orders
    snapshots: dict[str, Snapshot] = {}

    def at_switch(operation: Operation, step: Step) -> None:
        if operation is Operation.ROLLBACK and step is Step.SWITCH_WRITER:
            snapshots["switch"] = Snapshot.take(shop.src, shop.tgt)

    # When the rollback runs while they keep writing
    result = shop.runner(Hooks(after_record=at_switch)).rollback()
    time.sleep(1.0)
    stats = workload.stop()
    seconds = time.monotonic() - started
    # Then no transaction failed through either switch
    assert_no_failures(stats, seconds)
    assert result.kind == "after_cutover" and result.status == "done"
    # And when the writer moved back, the source held every row the target had (nothing lost)
    assert assert_no_difference(snapshots["switch"].diffs(TABLES)) > 5_000
    # And the source takes writes again with sequences past everything the target handed out
    assert server_port(shop.app) == shop.source.port
    conn = connect(shop.app)
    try:
        new_id = fetch_value(conn, "INSERT INTO orders (customer_id) VALUES (1) RETURNING id")
        new_invoice = fetch_value(conn, "SELECT invoice_no FROM orders WHERE id = %s", (new_id,))
    finally:
        conn.close()
    assert new_id > target_orders
    tgt = connect(shop.tgt)
    try:
        assert new_invoice > fetch_value(tgt, "SELECT max(invoice_no) FROM orders")
    finally:
        tgt.close()
    assert read_only_error(shop.src) is None
    # And the target is fenced, both replications are gone, and reads are back on the source
    assert read_only_error(shop.tgt) == "ReadOnlySqlTransaction"
    for dsn in (shop.src, shop.tgt):
        conn = connect(dsn)
        try:
            assert fetch_value(conn, "SELECT count(*) FROM pg_subscription") == 0
            assert fetch_value(conn, "SELECT count(*) FROM pg_replication_slots") == 0
        finally:
            conn.close()
    assert shop.router.state().read_weight == 0
    # And a second rollback, or a new cutover, is refused or changes nothing
    assert shop.runner().rollback().status == "already_done"
    with pytest.raises(Exception, match="was rolled back after its cutover"):
        shop.runner().cutover()


def start_anew(shop: Shop) -> None:
    """What the runbook says after an abandon: the target's fence lifted, its tables emptied, the replication
    started (and caught up)."""
    with closing(connect(shop.tgt)) as tgt:
        lift_fence(tgt)
        tables = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in TABLES)
        execute(tgt, sql.SQL("TRUNCATE {}").format(tables))
    shop.forward_engine().start()
    shop.wait_caught_up()


def test_abandoned_records_are_set_aside_so_the_migration_started_anew_cuts_over_again(shop: Shop) -> None:
    # Given a migration cut over (the writer on the target, which took an order)
    shop.runner().cutover()
    conn = connect(shop.app)
    try:
        fetch_value(conn, "INSERT INTO orders (customer_id) VALUES (1) RETURNING id")
    finally:
        conn.close()
    with closing(connect(shop.src)) as src, closing(connect(shop.tgt)) as tgt:
        assert replication_left(src, tgt, "zdm_shop", back_only=True) == [
            "source: subscription zdm_shop_rev (enabled)",
            "target: replication slot zdm_shop_rev (keeps WAL until it is dropped)",
            "target: publication zdm_shop_rev",
        ]
    # When the abandon's last step runs before any rollback / Then it is refused, the records untouched
    with pytest.raises(CutoverError, match=r"the writer may be on the target: roll back first\. Nothing was changed"):
        shop.runner().close_records()
    tgt = connect(shop.tgt)
    try:
        assert store.load(tgt, "shop", Operation.CUTOVER).status is Status.DONE  # type: ignore[union-attr]
    finally:
        tgt.close()

    # Given the rollback done, which leaves nothing of either replication (a new cutover is refused on its record)
    assert shop.runner().rollback().kind == "after_cutover"
    with closing(connect(shop.src)) as src, closing(connect(shop.tgt)) as tgt:
        assert replication_left(src, tgt, "zdm_shop") == []
    with pytest.raises(CutoverError, match="was rolled back after its cutover"):
        shop.runner().cutover()
    # When the records are set aside, twice (a retried task)
    first, second = shop.runner().close_records(), shop.runner().close_records()
    # Then the first sets aside the cutover and the rollback, kept in the log under another name; the second nothing
    assert first.status == "done" and second.status == "already_done"
    assert first.notes == ["set aside: cutover attempt 1: done", "set aside: rollback attempt 1: done"]
    tgt = connect(shop.tgt)
    try:
        assert store.load(tgt, "shop", Operation.CUTOVER) is None
        assert fetch_value(tgt, "SELECT count(*) FROM _zdm.cutover_log WHERE migration LIKE 'shop (abandoned %'") > 0
        assert fetch_value(tgt, "SELECT count(*) FROM _zdm.cutover_log WHERE migration = 'shop'") == 0
    finally:
        tgt.close()

    # And the migration started anew as the runbook says cuts over for real: a new attempt, every row on the target
    start_anew(shop)
    again = shop.runner().cutover()
    assert (again.status, again.attempt) == ("done", 1)
    assert server_port(shop.app) == shop.target.port
    assert assert_no_difference(shop.diffs()) > 5_000


def test_a_second_abandon_keeps_the_fence_a_rollback_after_the_cutover_left_on_the_target(shop: Shop) -> None:
    # Given a migration cut over, rolled back and abandoned: the target fenced, the records set aside
    shop.runner().cutover()
    shop.runner().rollback()
    shop.forward_engine().teardown()
    shop.runner().close_records()
    assert read_only_error(shop.tgt) == "ReadOnlySqlTransaction"
    # When it is abandoned again (its rollback, which finds no record, the teardown, the records)
    again = shop.runner().rollback()
    shop.forward_engine().teardown()
    shop.runner().close_records()
    # Then the target stays fenced: a client still pointed at it fails rather than writes where nobody reads
    assert again.kind == "before_cutover"
    assert {r.step: r.detail for r in again.steps}["lift_target_fence"] == {
        "lifted": False,
        "kept": "a rollback after the cutover left it",
    }
    assert read_only_error(shop.tgt) == "ReadOnlySqlTransaction"

    # And once a person lifted it and a new attempt's read shift fenced the target itself, a rollback before
    # that attempt's cutover lifts the read shift's fence, as for any attempt
    start_anew(shop)
    with closing(connect(shop.tgt)) as tgt:
        shift_reads(tgt, shop.router, "shop", 10, execution_started=None)
    assert read_only_error(shop.tgt) == "ReadOnlySqlTransaction"
    shop.runner().rollback()
    assert read_only_error(shop.tgt) is None


class SimulatedCrash(BaseException):
    """Stands for the process dying (a Lambda timeout): nothing catches it, nothing is undone."""


def test_a_rollback_asked_for_during_the_cutover_waits_for_it_then_rolls_back(shop: Shop) -> None:
    # Given a cutover under writes, paused for a moment after it switched the writer
    workload = run_workload(shop.app)
    time.sleep(0.5)
    rollback: dict[str, Any] = {}

    def alarm_meanwhile(operation: Operation, step: Step) -> None:
        if operation is Operation.CUTOVER and step is Step.SWITCH_WRITER:
            # When an alarm's rollback (another execution) starts while the cutover holds the lock
            thread = threading.Thread(target=lambda: rollback.update(result=shop.runner().rollback()))
            thread.start()
            rollback["thread"] = thread
            time.sleep(1.0)

    cut = shop.runner(Hooks(after_record=alarm_meanwhile)).cutover()
    rollback["thread"].join(timeout=120)
    stats = workload.stop()
    # Then the rollback waited for the cutover to finish, then rolled it back: the source is the writer again
    assert cut.status == "done"
    assert rollback["result"].kind == "after_cutover" and rollback["result"].status == "done"
    assert shop.router.state().writer is Side.SOURCE
    assert stats.failed == 0, stats.errors
    assert server_port(shop.app) == shop.source.port


@pytest.mark.parametrize("where", ["before_record", "after_record"])
def test_cutover_interrupted_at_every_step_resumes_and_completes(shop: Shop, where: str) -> None:
    # Given clients writing through pgbouncer
    workload = run_workload(shop.app, clients=8, rate=60)
    started = time.monotonic()
    time.sleep(1.0)
    crashes: list[str] = []
    fence_lsns: set[str] = set()
    # When every invocation dies at the next step (its effect done but not recorded, or just
    # recorded), and a new invocation runs each time
    for step in CUTOVER_STEPS:

        def die(operation: Operation, at: Step, step: Step = step) -> None:
            if at is step:
                raise SimulatedCrash(at.value)

        hooks = Hooks(**{where: die})
        with pytest.raises(SimulatedCrash):
            shop.runner(hooks).cutover()
        crashes.append(step.value)
        conn = connect(shop.tgt)
        try:
            progress = store.load(conn, "shop", Operation.CUTOVER)
        finally:
            conn.close()
        assert progress is not None and progress.status in (Status.RUNNING, Status.DONE)
        if progress.fence_lsn:
            fence_lsns.add(progress.fence_lsn)
    final = shop.runner().cutover()
    time.sleep(0.5)
    stats = workload.stop()
    # Then it completed once, in its first attempt, each step recorded once and the fence position kept
    assert crashes == [s.value for s in CUTOVER_STEPS]
    assert final.attempt == 1
    conn = connect(shop.tgt)
    try:
        steps = [h["step"] for h in store.history(conn, "shop")]
    finally:
        conn.close()
    assert steps == [s.value for s in CUTOVER_STEPS]
    assert len(fence_lsns) == 1
    # And clients waited through every interruption without a failed transaction
    assert_no_failures(stats, time.monotonic() - started)
    # And nothing was lost either way
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
    assert shop.router.state().writer is Side.TARGET


def durable_commits(shop: Shop, durable: bool) -> None:
    """Both servers' synchronous_commit on (the test servers run with it off, which a crash would show), or back."""
    for dsn in (shop.src, shop.tgt):
        with closing(connect(dsn)) as conn:
            execute(
                conn, "ALTER SYSTEM SET synchronous_commit = on" if durable else "ALTER SYSTEM RESET synchronous_commit"
            )
            execute(conn, "SELECT pg_reload_conf()")


@pytest.mark.parametrize("side", [Side.SOURCE, Side.TARGET])
def test_a_server_crash_inside_the_fence_leaves_the_cutover_to_resume_once_it_is_back(shop: Shop, side: Side) -> None:
    # Given clients writing through pgbouncer, their commits durable (a crash drops no acknowledged commit)
    durable_commits(shop, True)
    workload = run_workload(shop.app, clients=8, rate=60)
    started = time.monotonic()
    time.sleep(1.0)
    server = shop.source if side is Side.SOURCE else shop.target

    def crash(operation: Operation, step: Step) -> None:
        if step is Step.FENCE:
            server.kill()

    try:
        # When that server crashes (immediate shutdown) right after the fence is recorded (the step that meets it
        # first: the catch-up, or the sequences' sync when the target had caught up before the catch-up's first
        # read of the source; seen on a loaded machine)
        lost_at = f"lost its connection to the {side.value} at (catch_up|sync_sequences)"
        with pytest.raises(DatabaseUnreachable, match=lost_at) as lost:
            shop.runner(Hooks(after_record=crash)).cutover()
        # Then nothing was undone (which needs the server gone): the router still holds its clients
        assert "Nothing was undone" in str(lost.value)
        assert shop.router.state().holding
        server.restart()
        # And, the server back, the attempt is still running, past its fence, and the source still fenced
        with closing(connect(shop.tgt)) as tgt:
            progress = store.load(tgt, "shop", Operation.CUTOVER)
        assert progress is not None and progress.status is Status.RUNNING and progress.completed(Step.FENCE)
        assert read_only_error(shop.src) == "ReadOnlySqlTransaction"
    finally:
        if not server.is_running():
            server.restart()
        durable_commits(shop, False)
    # When the cutover runs again (the task's retry)
    final = shop.runner().cutover()
    time.sleep(0.5)
    stats = workload.stop()
    # Then it resumed the same attempt and completed it: the held clients waited, none failed
    assert final.status == "done" and final.attempt == 1
    assert shop.router.state().writer is Side.TARGET
    assert_no_failures(stats, time.monotonic() - started)
    # And nothing was lost: every committed order is on the new writer, and both databases are equal
    assert missing_orders(shop.tgt, stats.order_ids) == 0
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def test_direct_sessions_connected_before_the_fence_are_fenced_too(shop: Shop) -> None:
    # Given two sessions connected straight to the source before the cutover: one idle, one in
    # the middle of a write transaction that it keeps open
    idle = connect(shop.src, autocommit=False, application_name="direct-idle")
    fetch_value(idle, "SELECT 1")
    idle.commit()
    open_tx = connect(shop.src, autocommit=False, application_name="direct-open")
    execute(open_tx, "INSERT INTO customers (email, name) VALUES ('open-tx@example.com', 'Open Tx')")
    workload = run_workload(shop.app, clients=8, rate=60)
    time.sleep(0.5)
    # When the cutover runs (grace for open transactions: 0.5s)
    result = shop.runner(fence_grace_seconds=0.5).cutover()
    stats = workload.stop()
    # Then both old sessions were ended by the fence: the idle one after the router held its
    # clients, the open transaction after the grace
    fence = next(s for s in result.steps if s.step == "fence")
    ended = {s["application"]: s for s in fence.detail["ended_sessions"]}
    assert set(ended) >= {"direct-idle", "direct-open"}
    assert ended["direct-open"]["in_transaction"] is True
    assert ended["direct-open"]["transaction_seconds"] >= 0.5
    # And neither can write any more: their connections are gone
    for conn in (idle, open_tx):
        with pytest.raises(psycopg2.OperationalError):
            execute(conn, "INSERT INTO customers (email, name) VALUES ('late@example.com', 'Late')")
            conn.commit()
        conn.close()
    # And a new direct session is read-only
    assert read_only_error(shop.src) == "ReadOnlySqlTransaction"
    # And the uncommitted row is nowhere, and nothing committed was lost
    assert stats.failed == 0, stats.errors
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
    conn = connect(shop.tgt)
    try:
        assert fetch_value(conn, "SELECT count(*) FROM customers WHERE email LIKE %s", ("%open-tx%",)) == 0
    finally:
        conn.close()


def test_a_long_transaction_with_termination_off_fails_the_fence_cleanly_then_loses_nothing(shop: Shop) -> None:
    # Given an application client holding a write transaction open through pgbouncer, other
    # clients writing, and a cutover that may not end long transactions
    long_tx = connect(shop.app, autocommit=False, application_name="long-tx")
    execute(long_tx, "INSERT INTO customers (email, name) VALUES ('long-tx@example.com', 'Long Tx')")
    workload = run_workload(shop.app, clients=8, rate=60)
    started = time.monotonic()
    time.sleep(0.5)
    settings: dict[str, Any] = {
        "terminate_long_transactions": False,
        "fence_grace_seconds": 0.3,
        "fence_timeout_seconds": 1.0,
    }
    # When the cutover tries to fence writes
    with pytest.raises(CutoverAborted, match="could not fence writes") as caught:
        shop.runner(**settings).cutover()
    # Then the attempt is undone: the source takes writes again and pgbouncer's clients continue
    assert "long-tx" in str(caught.value)
    src = connect(shop.src)
    try:
        assert not is_fenced(src)
    finally:
        src.close()
    assert read_only_error(shop.src) is None
    state = shop.router.state()
    assert (state.writer, state.holding) == (Side.SOURCE, False)
    time.sleep(0.5)
    # And the long transaction commits, and a new attempt (after it) moves it to the target
    long_tx.commit()
    long_tx.close()
    result = shop.runner(**settings).cutover()
    stats = workload.stop()
    assert result.attempt == 2
    assert_no_failures(stats, time.monotonic() - started)  # clients waited through the failed attempt
    conn = connect(shop.tgt)
    try:
        assert fetch_value(conn, "SELECT count(*) FROM customers WHERE email = 'long-tx@example.com'") == 1
    finally:
        conn.close()
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def test_rollback_before_cutover_undoes_a_running_attempt_and_stops_replication(shop: Shop) -> None:
    # Given reads half on the target, and a cutover that died right after fencing (clients held)
    shop.router.set_read_weight(50)
    workload = run_workload(shop.app, clients=8, rate=60)
    time.sleep(0.5)

    def die(operation: Operation, step: Step) -> None:
        if step is Step.FENCE:
            raise SimulatedCrash("fence")

    with pytest.raises(SimulatedCrash):
        shop.runner(Hooks(after_record=die)).cutover()
    assert shop.router.state().holding
    # When the rollback runs
    result = shop.runner().rollback()
    time.sleep(0.5)
    stats = workload.stop()
    # Then it is a rollback before cutover: the attempt undone, reads back, forward replication stopped
    assert result.kind == "before_cutover"
    assert any("was running; it was undone" in n for n in result.notes)
    state = shop.router.state()
    assert (state.writer, state.read_weight, state.holding) == (Side.SOURCE, 0, False)
    assert read_only_error(shop.src) is None
    tgt = connect(shop.tgt)
    try:
        assert fetch_value(tgt, "SELECT subenabled FROM pg_subscription WHERE subname = 'zdm_shop'") is False
        assert store.load(tgt, "shop", Operation.CUTOVER).status is Status.ABORTED  # type: ignore[union-attr]
    finally:
        tgt.close()
    # And the clients only waited
    assert stats.failed == 0, stats.errors


def test_cutover_refuses_to_start_when_replication_is_not_streaming(shop: Shop) -> None:
    # Given forward replication stopped
    shop.forward_engine().stop()
    # When a cutover is asked for / Then it is refused before anything changes
    with pytest.raises(CutoverNotReady, match="not streaming"):
        shop.runner().cutover()
    assert_nothing_held(shop)


def assert_nothing_held(shop: Shop) -> None:
    """The source is not fenced and the router holds no client: a cutover that stopped before its fence."""
    src = connect(shop.src)
    try:
        assert not is_fenced(src)
    finally:
        src.close()
    assert not shop.router.state().holding


def test_a_lock_held_on_a_target_table_stops_the_cutover_before_its_fence_not_inside_the_pause(shop: Shop) -> None:
    # Given a session on the target holding a SHARE UPDATE EXCLUSIVE lock on a table (a manual VACUUM or
    # ANALYZE after the copy), which the back replication's publication needs
    holder = connect(shop.tgt, application_name="vacuum-after-copy", autocommit=False)
    execute(holder, "LOCK TABLE orders IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        # When a cutover is asked for / Then it gives up naming the session, before the fence: the source
        # was never fenced, no client was held, no attempt was begun
        with pytest.raises(TableLocksBusy, match=r"creating publication zdm_shop_rev .* application vacuum-after-copy"):
            shop.runner(logical=LogicalSettings(lock_wait_seconds=2)).cutover()
        assert_nothing_held(shop)
        assert shop.runner().status()["cutover"] is None
    finally:
        holder.close()

    # And once the lock is gone the cutover runs
    assert shop.runner().cutover().status == "done"


def test_rollback_with_the_target_unreachable(shop: Shop) -> None:
    # Given a runner whose target cannot be reached, the writer still on the source
    unreachable = shop.target.dsn(shop.dbname).replace(f"port={shop.target.port}", "port=1")
    runner = CutoverRunner(shop.src, unreachable, shop.router, shop.plan())
    # When it rolls back / Then it works from the source and the router alone
    result = runner.rollback()
    assert result.kind == "before_cutover"
    assert any("could not be reached" in n for n in result.notes)
    assert shop.router.state().writer is Side.SOURCE
    # And with the writer on the target it changes nothing, since target writes would be lost, and fails as
    # unreachable: the task's retries (DatabaseUnreachable) wait for the target
    shop.router.switch_writer(Side.TARGET)
    with pytest.raises(DatabaseUnreachable, match=r"would lose .* nothing was changed: the rollback waits"):
        runner.rollback()
    assert shop.router.state().writer is Side.TARGET


def test_a_failure_after_replication_stopped_is_undone_and_a_new_attempt_loses_nothing(shop: Shop) -> None:
    # Given clients writing, and a cutover whose back replication cannot reach the target
    # (the source server is told a dead address for it)
    workload = run_workload(shop.app, clients=8, rate=60)
    started = time.monotonic()
    time.sleep(0.5)
    dead = shop.tgt.replace(f"port={shop.target.port}", "port=1")
    broken = CutoverRunner(shop.src, shop.tgt, shop.router, shop.plan(), target_conninfo=dead)
    # When it fails at that step, after forward replication was stopped
    with pytest.raises(CutoverAborted, match="start_back_replication") as caught:
        broken.cutover()
    assert "was undone" in str(caught.value)
    # Then the source takes writes again, clients continue there, and forward replication runs again
    assert read_only_error(shop.src) is None
    assert shop.router.state().writer is Side.SOURCE and not shop.router.state().holding
    tgt = connect(shop.tgt)
    try:
        assert fetch_value(tgt, "SELECT subenabled FROM pg_subscription WHERE subname = 'zdm_shop'") is True
    finally:
        tgt.close()
    until(lambda: shop.forward_engine().status().problems == [], 15, "the forward apply worker to run again")
    time.sleep(0.5)
    # And a new attempt completes and loses nothing
    result = shop.runner().cutover()
    time.sleep(0.5)
    stats = workload.stop()
    assert result.attempt == 2 and result.status == "done"
    assert_no_failures(stats, time.monotonic() - started)
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
