"""Cutover with engine dms carrying source -> target, under writes through pgbouncer.

DMS is an AWS service; here a stand-in plays the task: `SubscriptionTask` answers the DMS calls the
engine makes (describe, table statistics, start, stop) over a real logical subscription that copies
the tables and the fence-marker table and then streams their changes in commit order, as a DMS task
with BatchApplyEnabled false does. What is proven is our side: the marker is written after the
fence and waited for on the target, the task is stopped (and seen stopped) before the replication
back starts, and no write is lost or applied twice. DMS's own behaviour is not (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2.extensions
import pytest
from cutover_env import (
    TABLES,
    Shop,
    assert_no_difference,
    clean_up,
    cutover_under_writes,
    longest_gap,
    start_shop,
    until,
)
from psycopg2 import sql

from lambdas.core.cutover import CutoverAborted, CutoverRunner, Hooks, Operation, Step
from lambdas.core.db import connect, execute, fetch_all, fetch_value
from lambdas.core.engines.base import Phase
from lambdas.core.engines.dms import FENCE_MARKER_TABLE, DmsEngine, DmsTarget
from lambdas.core.engines.dms_fence import DmsForwardStream
from lambdas.core.routers.base import Side
from rehearsal.compare import Snapshot
from rehearsal.servers import PostgresServer

TASK_ARN = "arn:aws:dms:eu-west-1:123456789012:task:ZDMSHOPLOADCDC"


class SubscriptionTask:
    """The DMS calls `DmsEngine` makes for a task, answered by a logical subscription `dms_emu`."""

    def __init__(self, source_dsn: str, target_dsn: str) -> None:
        self.source_dsn = source_dsn
        self.target_dsn = target_dsn
        self.calls: list[str] = []
        self.created = False
        self.stuck = False  # when set, the "task" says running but applies nothing

    def _target(self, query: str) -> list[tuple[Any, ...]]:
        conn = connect(self.target_dsn)
        try:
            return fetch_all(conn, query)
        finally:
            conn.close()

    def _status(self) -> str:
        if not self.created:
            return "ready"
        enabled, worker = self._target(
            "SELECT s.subenabled, EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.pid IS NOT NULL)"
            " FROM pg_subscription s WHERE s.subname = 'dms_emu'"
        )[0]
        if enabled or self.stuck:
            return "running"
        return "stopping" if worker else "stopped"

    def describe_replication_tasks(self, **_: Any) -> dict[str, Any]:
        stats = {"FullLoadProgressPercent": 100 if self.created else 0, "TablesErrored": 0}
        return {"ReplicationTasks": [{"Status": self._status(), "StopReason": "", "ReplicationTaskStats": stats}]}

    def describe_table_statistics(self, **_: Any) -> dict[str, Any]:
        rows = self._target(
            "SELECT n.nspname, c.relname, r.srsubstate FROM pg_subscription_rel r JOIN pg_class c ON c.oid = r.srrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
        )
        return {
            "TableStatistics": [
                {"SchemaName": s, "TableName": t, "TableState": "Table completed" if state == "r" else "Full load"}
                for s, t, state in rows
            ]
        }

    def start_replication_task(self, *, ReplicationTaskArn: str, StartReplicationTaskType: str) -> dict[str, Any]:
        self.calls.append(f"start:{StartReplicationTaskType}")
        if StartReplicationTaskType == "start-replication":
            source = connect(self.source_dsn)
            try:
                names = sql.SQL(", ").join(t.ident for t in (*TABLES, FENCE_MARKER_TABLE))
                execute(source, sql.SQL("CREATE PUBLICATION dms_emu FOR TABLE {}").format(names))
            finally:
                source.close()
            self._subscribe()
            self.created = True
        elif StartReplicationTaskType == "reload-target":
            # Every table loaded again, then the changes from there: a subscription made anew (its slot too)
            self._subscribe(again=True)
        else:
            self._alter("ENABLE")
        return {}

    def _subscribe(self, *, again: bool = False) -> None:
        target = connect(self.target_dsn)
        try:
            if again:
                execute(target, "DROP SUBSCRIPTION dms_emu")
            execute(
                target,
                sql.SQL("CREATE SUBSCRIPTION dms_emu CONNECTION {} PUBLICATION dms_emu").format(
                    sql.Literal(self.source_dsn)
                ),
            )
        finally:
            target.close()

    def stop_replication_task(self, *, ReplicationTaskArn: str) -> dict[str, Any]:
        self.calls.append("stop")
        self._alter("DISABLE")
        return {}

    def _alter(self, action: str) -> None:
        target = connect(self.target_dsn)
        try:
            execute(target, sql.SQL("ALTER SUBSCRIPTION dms_emu {}").format(sql.SQL(action)))
        finally:
            target.close()

    # not used for a task (kind "serverless" only)
    def describe_replications(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("a task, not a serverless replication")

    def describe_replication_table_statistics(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("a task, not a serverless replication")

    def start_replication(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("a task, not a serverless replication")

    def stop_replication(self, **_: Any) -> dict[str, Any]:
        raise AssertionError("a task, not a serverless replication")


class NoMetrics:
    def get_metric_data(self, **_: Any) -> dict[str, Any]:
        return {"MetricDataResults": []}


@pytest.fixture
def dms_shop(
    pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]
) -> Iterator[tuple[Shop, DmsForwardStream, SubscriptionTask]]:
    source, target = pg_pair
    dbname = psycopg2.extensions.parse_dsn(fresh_dbs[0])["dbname"]
    shop = start_shop(source, target, dbname, forward=False)
    task = SubscriptionTask(shop.src, shop.tgt)
    stream = DmsForwardStream(
        DmsEngine(task, NoMetrics(), DmsTarget("task", TASK_ARN)), shop.src, shop.tgt, "shop", stop_poll_seconds=0.05
    )
    try:
        stream.start()
        until(lambda: stream.status().phase is Phase.STREAMING, 60, "the stand-in task's full load")
        yield shop, stream, task
    finally:
        clean_up(shop)


def runner(shop: Shop, stream: DmsForwardStream, hooks: Hooks | None = None) -> CutoverRunner:
    return CutoverRunner(shop.src, shop.tgt, shop.router, shop.plan(), hooks=hooks, forward_stream=stream)


def test_the_first_start_creates_the_marker_table_on_both_sides_and_starts_the_task(
    dms_shop: tuple[Shop, DmsForwardStream, SubscriptionTask],
) -> None:
    # Given the engine started once (the fixture) and then asked to start again (a retried task)
    shop, stream, task = dms_shop
    result = stream.start()
    # Then the marker table exists on both databases, the task was started once and left running the second time
    for dsn in (shop.src, shop.tgt):
        conn = connect(dsn)
        try:
            assert fetch_value(conn, "SELECT to_regclass(%s) IS NOT NULL", (FENCE_MARKER_TABLE.regclass,))
        finally:
            conn.close()
    assert result.already_running
    assert task.calls == ["start:start-replication"]


def test_cutover_over_dms_waits_for_the_marker_and_stops_the_task_before_replicating_back(
    dms_shop: tuple[Shop, DmsForwardStream, SubscriptionTask],
) -> None:
    # Given the stand-in task streaming and 8 clients writing through pgbouncer
    shop, stream, task = dms_shop
    seen: dict[str, Any] = {}

    def at_step(operation: Operation, step: Step) -> None:
        if step is Step.STOP_REPLICATION:
            seen["task_after_stop"] = task.describe_replication_tasks()["ReplicationTasks"][0]["Status"]
        if step is Step.SWITCH_WRITER:  # clients are held: both sides stand still
            seen["switch"] = Snapshot.take(shop.src, shop.tgt)

    # When the cutover runs while 8 clients write through pgbouncer
    # Then no transaction failed, every step ran, and the catch-up waited for the fence marker
    result, stats = cutover_under_writes(shop, runner(shop, stream, Hooks(after_record=at_step)))
    catch_up = next(s for s in result.steps if s.step == Step.CATCH_UP.value)
    tokens = _markers(shop.tgt)
    assert len(tokens) == 1 and tokens == _markers(shop.src)
    # And the task was stopped, and seen stopped, before the replication back started
    assert seen["task_after_stop"] == "stopped"
    assert task.calls == ["start:start-replication", "stop"]
    # And at the switch both databases held exactly the same rows
    assert assert_no_difference(seen["switch"].diffs(TABLES)) > 5_000
    # And writes made on the target since come back to the source by native replication, not by the task
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())
    assert shop.router.state().writer is Side.TARGET
    print(
        f"\ndms cutover: longest write pause {longest_gap(stats) * 1000:.0f} ms, "
        f"fence to release {(result.pause_seconds or 0) * 1000:.0f} ms, catch-up {catch_up.detail}"
    )


def test_a_marker_that_never_arrives_aborts_the_cutover_and_the_task_resumes(
    dms_shop: tuple[Shop, DmsForwardStream, SubscriptionTask],
) -> None:
    # Given a task that says it runs but applies nothing (its apply stalled)
    shop, stream, task = dms_shop
    task._alter("DISABLE")
    task.stuck = True
    stalled = CutoverRunner(
        shop.src, shop.tgt, shop.router, shop.plan(catch_up_timeout_seconds=2.0), forward_stream=stream
    )
    # When the cutover runs
    with pytest.raises(CutoverAborted, match="catch_up") as caught:
        stalled.cutover()
    # Then it was undone: clients write to the source again, the writer never moved
    assert "was undone" in str(caught.value)
    assert shop.router.state().writer is Side.SOURCE and not shop.router.state().holding
    conn = connect(shop.app)
    try:
        new_id = fetch_value(conn, "INSERT INTO customers (email, name) VALUES ('late@x', 'late') RETURNING id")
    finally:
        conn.close()
    # And once the task applies again, that write and the marker reach the target and a new attempt completes
    task.stuck = False
    task._alter("ENABLE")
    until(lambda: _exists(shop.tgt, new_id), 30, "the write after the undone cutover to reach the target")
    result = runner(shop, stream).cutover()
    assert result.status == "done" and result.attempt == 2
    shop.wait_caught_up(reverse=True)
    assert_no_difference(shop.diffs())


def test_a_start_resumes_a_stopped_task_over_its_rows_and_reloads_it_over_an_emptied_target(
    dms_shop: tuple[Shop, DmsForwardStream, SubscriptionTask],
) -> None:
    # Given the stand-in task streaming, stopped (a cutover undone), and a write on the source meanwhile
    shop, stream, task = dms_shop
    stream.stop()
    until(lambda: stream.status().phase is Phase.STOPPED, 30, "the task to stop")
    _insert_customer(shop.src, "while-stopped@x")
    # When it is started again over the target's rows / Then it resumes from its stop, and the write arrives
    stream.start()
    assert task.calls[-1] == "start:resume-processing"
    until(lambda: _equal(shop), 30, "the resumed task to carry the write made while it was stopped")
    # Given it is then stopped as an abandon stops it (its teardown: the stack owns the task), and the target
    # emptied to migrate again, as preflight's target_empty asks, while the source takes one more write
    stream.teardown()
    until(lambda: stream.status().phase is Phase.STOPPED, 30, "the task to stop")
    target = connect(shop.tgt)
    try:
        execute(target, sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(t.ident for t in TABLES)))
    finally:
        target.close()
    _insert_customer(shop.src, "after-abandon@x")
    # When the migration starts anew
    stream.start()
    # Then the task loads every table again rather than resume (which would bring only the changes since its
    # stop: every earlier row missing on the target), and both databases end equal
    assert task.calls[-1] == "start:reload-target"
    until(lambda: _equal(shop), 60, "the reloaded task to copy every table again")
    assert stream.status().phase is Phase.STREAMING


def _insert_customer(dsn: str, email: str) -> None:
    conn = connect(dsn)
    try:
        execute(conn, "INSERT INTO customers (email, name) VALUES (%s, 'x')", (email,))
    finally:
        conn.close()


def _equal(shop: Shop) -> bool:
    return all(d.equal for d in shop.diffs())


def test_validation_re_checks_wait_for_a_marker_of_their_own_not_the_cutover(
    dms_shop: tuple[Shop, DmsForwardStream, SubscriptionTask],
) -> None:
    # Given the stand-in task streaming, and a write just committed on the source
    shop, stream, _ = dms_shop
    conn = connect(shop.src)
    try:
        new_id = fetch_value(conn, "INSERT INTO customers (email, name) VALUES ('now@x', 'now') RETURNING id")
    finally:
        conn.close()
    # When a validation re-check waits for the target to catch up (no fence: writes go on)
    reached = stream.catch_up(10)
    # Then that write is on the target as soon as the wait returns, and the marker went through the task
    assert _exists(shop.tgt, new_id)
    assert reached.waited_seconds < 10 and len(_markers(shop.tgt)) == 1
    # And a task that applies nothing makes the wait time out (the chunk reports the rows unsettled)
    stream.engine.stop()
    with pytest.raises(TimeoutError, match="fence marker"):
        stream.catch_up(1)


def _markers(dsn: str) -> list[str]:
    conn = connect(dsn)
    try:
        return [
            r[0]
            for r in fetch_all(conn, sql.SQL("SELECT token FROM {} ORDER BY token").format(FENCE_MARKER_TABLE.ident))
        ]
    finally:
        conn.close()


def _exists(dsn: str, customer_id: int) -> bool:
    conn = connect(dsn)
    try:
        return bool(fetch_value(conn, "SELECT EXISTS (SELECT 1 FROM customers WHERE id = %s)", (customer_id,)))
    finally:
        conn.close()
