"""The database side of the write fence, on a real server, with a router that cannot hold clients."""

from __future__ import annotations

import os
import signal
import threading
import time

import psycopg2
import pytest
from psycopg2 import sql

from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.fence import (
    Backend,
    FenceError,
    FenceTimeout,
    end_backends,
    fence_position,
    is_fenced,
    lift_fence,
    sessions_of,
    take_fence,
)
from lambdas.core.lsn import current_lsn
from lambdas.core.routers.base import NoHold, RouterState, Side, TrafficRouter


class DnsLikeRouter(TrafficRouter):
    """A router that cannot hold clients (as Route53 or RDS Proxy): the database fence stands alone."""

    name = "dns-like"

    def __init__(self) -> None:
        self.holds = 0
        self.cancels = 0

    def set_read_weight(self, target_percent: int) -> None:
        return None

    def begin_hold(self) -> NoHold:
        self.holds += 1
        router = self

        class Counting(NoHold):
            def cancel(self) -> None:
                router.cancels += 1

        return Counting()

    def switch_writer(self, side: Side) -> None:
        return None

    def release(self) -> None:
        return None

    def state(self) -> RouterState:
        return RouterState(Side.SOURCE, 0, False)


@pytest.fixture
def db(fresh_dbs: tuple[str, str]) -> str:
    src, _ = fresh_dbs
    conn = connect(src)
    execute(conn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    conn.close()
    return src


def test_old_sessions_are_ended_new_ones_are_read_only_and_lifting_restores_writes(db: str) -> None:
    # Given an idle session and one inside a write transaction, both connected before the fence
    idle = connect(db, autocommit=False, application_name="idle")
    fetch_value(idle, "SELECT 1")
    idle.commit()
    writer = connect(db, autocommit=False, application_name="writer")
    execute(writer, "INSERT INTO t VALUES (1, 'uncommitted')")
    control = connect(db)
    router = DnsLikeRouter()
    # When the fence is taken with a grace of 0.3 s
    started = time.monotonic()
    result = take_fence(control, router, grace=0.3, timeout=3)
    took = time.monotonic() - started
    # Then the idle session was ended at once and the transaction after its grace
    ended = {s.application: s for s in result.ended}
    assert set(ended) == {"idle", "writer"}
    assert ended["writer"].in_transaction and not ended["idle"].in_transaction
    assert 0.3 <= took < 2.0
    assert not result.router_held_clients
    # And neither can commit anything any more
    with pytest.raises(psycopg2.OperationalError):
        writer.commit()
    # And a new session cannot write, but can read
    fresh = connect(db, autocommit=False)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
        execute(fresh, "INSERT INTO t VALUES (2, 'x')")
    fresh.rollback()
    assert fetch_value(fresh, "SELECT count(*) FROM t") == 0
    fresh.close()
    # And the position noted after the fence is the insert position (never behind the written
    # one), and noting it leaves the fence in place
    written = current_lsn(control)
    assert fence_position(control) >= written
    assert is_fenced(control)
    # And lifting it makes new sessions writable again
    assert lift_fence(control) is True
    assert lift_fence(control) is False
    again = connect(db)
    execute(again, "INSERT INTO t VALUES (3, 'after')")
    again.close()
    for conn in (idle, writer, control):
        conn.close()


def test_a_fence_that_cannot_be_taken_in_time_is_lifted(db: str) -> None:
    # Given a transaction that keeps running, and a fence that must not end it
    long_tx = connect(db, autocommit=False, application_name="long")
    execute(long_tx, "INSERT INTO t VALUES (10, 'long')")
    control = connect(db)
    router = DnsLikeRouter()
    # When the fence is tried
    with pytest.raises(FenceTimeout, match=r"pid .*application 'long'.* in a transaction") as caught:
        take_fence(control, router, grace=0.2, timeout=0.6, terminate_long=False)
    # Then the database is writable as before, the router's hold was cancelled, and nothing was lost
    assert "fence was lifted" in str(caught.value)
    assert not is_fenced(control)
    assert router.cancels == 1
    long_tx.commit()
    assert fetch_value(control, "SELECT v FROM t WHERE id = 10") == "long"
    long_tx.close()
    control.close()


def test_a_role_that_overrides_the_read_only_default_is_refused_up_front(db: str) -> None:
    # Given a role that sets default_transaction_read_only itself (it would slip through)
    control = connect(db)
    dbname = fetch_value(control, "SELECT current_database()")
    execute(control, "DROP ROLE IF EXISTS zdm_sneaky")
    execute(control, "CREATE ROLE zdm_sneaky")
    execute(
        control,
        sql.SQL("ALTER ROLE zdm_sneaky IN DATABASE {} SET default_transaction_read_only = off").format(
            sql.Identifier(dbname)
        ),
    )
    router = DnsLikeRouter()
    try:
        # When the fence is tried / Then it is refused before anything changed
        with pytest.raises(FenceError, match="zdm_sneaky"):
            take_fence(control, router, grace=0.1, timeout=1)
        assert not is_fenced(control) and router.holds == 0
    finally:
        execute(
            control,
            sql.SQL("ALTER ROLE zdm_sneaky IN DATABASE {} RESET default_transaction_read_only").format(
                sql.Identifier(dbname)
            ),
        )
        execute(control, "DROP ROLE zdm_sneaky")
        control.close()


def test_a_session_that_turns_read_only_off_after_the_fence_is_ended_when_it_writes(db: str) -> None:
    # Given a fence being taken while a new session (after the fence) overrides read-only and writes
    control = connect(db)
    router = DnsLikeRouter()
    errors: list[BaseException] = []

    def rogue() -> None:
        time.sleep(0.2)  # connects once the fence is set
        conn = connect(db, autocommit=False, application_name="rogue")
        try:
            execute(conn, "SET transaction_read_only = off")
            execute(conn, "INSERT INTO t VALUES (20, 'rogue')")
            time.sleep(2)
            conn.commit()
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=rogue)
    blocker = connect(db, autocommit=False)  # keeps the fence busy for its grace
    execute(blocker, "SELECT 1")
    thread.start()
    result = take_fence(control, router, grace=0.5, timeout=3)
    thread.join(5)
    # Then the rogue session was ended: its write transaction id gave it away
    assert "rogue" in {s.application for s in result.ended}
    assert errors and isinstance(errors[0], psycopg2.OperationalError)
    lift_fence(control)
    assert fetch_value(control, "SELECT count(*) FROM t WHERE id = 20") == 0
    blocker.close()
    control.close()


def test_sessions_left_to_a_stream_outlive_the_fence_until_they_are_ended_by_pid_and_start(db: str) -> None:
    # Given two sessions a change stream names as its own (its role, an application name Debezium gives), and one
    # of another application, all connected before the fence
    ours = [connect(db, application_name=f"Debezium {n}") for n in ("General", "Heartbeat")]
    other = connect(db, application_name="app")
    control = connect(db)
    user = fetch_value(control, "SELECT current_user")
    left = sessions_of(control, user, "Debezium %")
    assert {b.pid for b in left} == {c.get_backend_pid() for c in ours}
    assert sessions_of(control, "nobody", "Debezium %") == []
    # When the fence is taken leaving them alone
    result = take_fence(control, DnsLikeRouter(), grace=0.0, timeout=3, exempt_pids=[b.pid for b in left])
    # Then it ended only the other session; the stream's sessions still run (and could still write)
    assert [s.application for s in result.ended] == ["app"]
    for conn in ours:
        execute(conn, "INSERT INTO t VALUES (%s, 'left')", (conn.get_backend_pid(),))
    # And a backend named by its pid but another start (the pid handed to a new process) is not ended
    stale = Backend(left[0].pid, left[0].started_us - 1)
    assert end_backends(control, [stale], timeout=3) == 0
    execute(ours[0], "SELECT 1")
    # And ending them by pid and start returns once both are gone, and the second time ends nothing
    assert end_backends(control, left, timeout=3) == 2
    assert (
        fetch_value(control, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", ([b.pid for b in left],)) == 0
    )
    assert end_backends(control, left, timeout=3) == 0
    for conn in ours:
        with pytest.raises(psycopg2.OperationalError):
            execute(conn, "SELECT 1")
    for conn in (*ours, other, control):
        conn.close()


def test_ending_sessions_gives_up_with_an_error_naming_them_when_one_does_not_end_in_time(db: str) -> None:
    # Given a stream's session whose server process is stopped (SIGSTOP: it cannot act on being ended, as a
    # backend stuck in I/O), connected before the fence
    stuck = connect(db, application_name="Debezium General")
    control = connect(db)
    (left,) = sessions_of(control, fetch_value(control, "SELECT current_user"), "Debezium %")
    os.kill(left.pid, signal.SIGSTOP)
    try:
        # When the catch-up ends it with a timeout of 0.3 s
        started = time.monotonic()
        with pytest.raises(FenceError, match=rf"session\(s\) {left.pid} did not end within 0.3 s"):
            end_backends(control, [left], timeout=0.3)
        # Then it gave up after about that long, naming the session (a cutover's catch-up aborts on it)
        assert 0.3 <= time.monotonic() - started < 3
        assert fetch_value(control, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (left.pid,)) == 1
    finally:
        os.kill(left.pid, signal.SIGCONT)
    # And once the process runs again it ends, and a second call returns as soon as it is gone
    assert end_backends(control, [left], timeout=5) in (0, 1)
    assert fetch_value(control, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (left.pid,)) == 0
    stuck.close()
    control.close()
