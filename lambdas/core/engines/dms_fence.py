"""Engine dms at the cutover: a marker row tells when DMS has applied everything up to the fence.

DMS exposes no applied position (only one-minute CloudWatch latency datapoints), so the cutover
writes a row into `_zdm.dms_fence_markers` on the source after the fence and waits until that row
is on the target. The task applies the source's transactions whole and in commit order (the stack
sets BatchApplyEnabled false), and the marker commits after every write the fence let through,
so the row's arrival proves those writes were applied. The task is then stopped, and the cutover
waits until DMS says it stopped before the replication back starts: a task still running would
carry the target's writes, replicated back into the source, to the target a second time.

Validation's re-checks wait the same way (`catch_up`): a marker row, whose arrival proves the
target applied everything the source had committed before it (seconds, where DMS's one-minute
CloudWatch latency datapoints took minutes).

The marker table is created on both databases before the task first starts (the task's table
mappings name it, `dms.table_mappings`); rows of earlier attempts stay (a token each).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from psycopg2 import sql

from lambdas.core.config import DMS_STOP_TIMEOUT_SECONDS
from lambdas.core.db import Connection, connect, execute, fetch_value
from lambdas.core.engines.base import (
    FenceReached,
    Phase,
    ReplicationEngine,
    ReplicationStatus,
    StartResult,
    TeardownResult,
)
from lambdas.core.engines.dms import FENCE_MARKER_TABLE as MARKER_TABLE
from lambdas.core.engines.dms import DmsBehind, DmsEngine
from lambdas.core.fence import Backend, make_writable
from lambdas.core.tables import TableName

STOP_TIMEOUT_SECONDS = DMS_STOP_TIMEOUT_SECONDS  # how long the cutover waits for DMS to say the task stopped


def ensure_marker_table(conn: Connection) -> None:
    execute(conn, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(MARKER_TABLE.schema)))
    execute(
        conn,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (token text PRIMARY KEY, migration text NOT NULL,"
            " written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        ).format(MARKER_TABLE.ident),
    )


class DmsForwardStream(ReplicationEngine):
    """The dms engine as the cutover drives it (`cutover.runner.ForwardChangeStream`), and as the
    Replication task starts it (the marker table first)."""

    name = "dms"

    def __init__(
        self,
        engine: DmsEngine,
        source_dsn: str,
        target_dsn: str,
        migration: str,
        *,
        connector: Callable[..., Connection] = connect,
        poll_seconds: float = 0.05,
        stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS,
        stop_poll_seconds: float = 2.0,
    ) -> None:
        self.engine = engine
        self._source_dsn = source_dsn
        self._target_dsn = target_dsn
        self.migration = migration
        self._connect = connector
        self._poll = poll_seconds
        self._stop_timeout = stop_timeout_seconds
        self._stop_poll = stop_poll_seconds

    def _session(self, dsn: str) -> Connection:
        conn = self._connect(dsn, application_name="zdm-dms-fence")
        make_writable(conn)  # the read shift fences the target; the marker table is ours to write
        return conn

    def start(self) -> StartResult:
        """The marker table on both databases, then the task (started, resumed or reloaded: `DmsEngine.start`).

        A task that ran before and is stopped, over a target whose every table it loaded is empty, loads them
        all again (the migration started anew after an abandon, which stops the task the stack owns, and the
        target emptied as preflight's `target_empty` asks): resumed, it would apply only the changes made since
        its stop, and every row from before would be missing on the target. Over a target holding rows it
        resumes (a cutover undone, a task that failed).

        Before the task's first start, and before a reload, the target's copy of the marker table is emptied:
        the full load copies the source's rows into it, and rows left by an earlier run would collide."""
        phase = self.engine.status().phase
        reload = phase in (Phase.STOPPED, Phase.FAILED) and self._target_empty(self.engine.loaded_tables())
        fresh = phase is Phase.NOT_STARTED or reload
        for dsn in (self._source_dsn, self._target_dsn):
            conn = self._session(dsn)
            try:
                ensure_marker_table(conn)
                if fresh and dsn == self._target_dsn:
                    execute(conn, sql.SQL("DELETE FROM {}").format(MARKER_TABLE.ident))
            finally:
                conn.close()
        return self.engine.start(reload=reload)

    def _target_empty(self, tables: list[TableName]) -> bool:
        """Whether every one of `tables` but the marker table is empty on the target (one missing there holds
        nothing); False when there are none to judge by."""
        judged = [t for t in tables if t != MARKER_TABLE]
        if not judged:
            return False
        conn = self._connect(self._target_dsn, application_name="zdm-dms-start")
        try:
            for table in judged:
                exists = fetch_value(conn, "SELECT to_regclass(%s) IS NOT NULL", (table.regclass,))
                if exists and fetch_value(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table.ident)):
                    return False
            return True
        finally:
            conn.close()

    def status(self) -> ReplicationStatus:
        return self.engine.status()

    def wait_for_fence(self, source: Connection, timeout: float) -> FenceReached:
        """After the fence: write a marker row on the source, return once the target has it."""
        started = time.monotonic()
        token = uuid.uuid4().hex
        execute(source, "SET synchronous_commit = on")
        execute(
            source,
            sql.SQL("INSERT INTO {} (token, migration) VALUES (%s, %s)").format(MARKER_TABLE.ident),
            (token, self.migration),
        )
        marker_lsn = str(fetch_value(source, "SELECT pg_current_wal_lsn()::text"))
        target = self._session(self._target_dsn)
        try:
            query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE token = %s)").format(MARKER_TABLE.ident)
            while not fetch_value(target, query, (token,)):
                if time.monotonic() - started > timeout:
                    raise DmsBehind(
                        f"DMS did not carry the fence marker ({MARKER_TABLE}, token {token}) to the target within"
                        f" {timeout:g} s: its apply is behind or the table is not in the task's mappings"
                    )
                time.sleep(self._poll)
        finally:
            target.close()
        waited = time.monotonic() - started
        return FenceReached(marker_lsn, waited, {}, waited)

    def catch_up(self, timeout: float) -> FenceReached:
        """Return once the target has applied everything the source committed so far (validation's
        re-checks): the same marker as the cutover's, on a session of its own; the source need not be fenced."""
        source = self._session(self._source_dsn)
        try:
            return self.wait_for_fence(source, timeout)
        finally:
            source.close()

    def own_source_sessions(self, source: Connection) -> list[Backend]:
        """None is known: the fence ends DMS's client sessions on the source like any other (not tested on AWS)."""
        return []

    def pause_applying(self) -> None:
        """Stop the task and wait until DMS says it stopped: nothing is applied after this."""
        self.engine.wait_stopped(self._stop_timeout, poll_seconds=self._stop_poll)

    def stop(self) -> None:
        self.engine.stop()

    def teardown(self) -> TeardownResult:
        return self.engine.teardown()
