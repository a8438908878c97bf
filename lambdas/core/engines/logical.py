"""PostgreSQL native logical replication: a publication on the source, a subscription on the target.

Initial copy, by `copy_method`:
- parallel-snapshot: the slot is created over the replication protocol with EXPORT_SNAPSHOT,
  key ranges are copied in parallel from that snapshot, then a subscription is attached to
  the existing slot without copying. The copy's progress is recorded on the target in
  `_zdm.copy_state`, so a start interrupted mid-copy is recognised and redone from scratch; a
  target restart during the copy is ridden through by the same start (`copy_in_parallel`).
- subscription: PostgreSQL's own table synchronisation (one stream per table).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from lambdas.core.catalog import TableInfo, describe_tables, partition_trees
from lambdas.core.config import LogicalSettings
from lambdas.core.db import (
    Connection,
    connect,
    connection_lost,
    execute,
    fetch_all,
    fetch_one,
    fetch_value,
    keep_when_idle,
    server_version_num,
    when_reachable,
    with_unbounded_session,
)
from lambdas.core.engines.base import (
    Phase,
    ReplicationEngine,
    ReplicationStatus,
    SlotHealth,
    StartResult,
    TableStatus,
    TableSyncState,
    TeardownResult,
)
from lambdas.core.engines.deferred_indexes import defer_indexes, ensure_deferred_table, restore_indexes
from lambdas.core.engines.slot_creation import create_logical_slot
from lambdas.core.engines.snapshot_copy import ChunkCopied, CopyChunk, CopySessionFactory, copy_in_parallel
from lambdas.core.engines.table_locks import run_waiting_for_locks
from lambdas.core.fence import make_writable
from lambdas.core.lsn import Lsn, applied_lsn
from lambdas.core.ranges import plan_ranges
from lambdas.core.schema_compare import (
    FORWARD_SIDES,
    Sides,
    drift_problem,
    join_names,
    partitions_missing,
    schema_drift,
)
from lambdas.core.statement_logging import settings_keeping_statements
from lambdas.core.tables import TableName

STATE_SCHEMA = "_zdm"

_SUBSCRIPTION_STATES = {
    "i": TableSyncState.PENDING,
    "d": TableSyncState.COPYING,
    "f": TableSyncState.COPIED,
    "s": TableSyncState.COPIED,
    "r": TableSyncState.READY,
}


class ReplicationSetupError(RuntimeError):
    pass


STREAMING_VERSION = 140000  # subscriptions stream large transactions in progress from PostgreSQL 14 (both sides)


@contextmanager
def _statement_not_logged_on_error(conn: Connection) -> Iterator[None]:
    """CREATE SUBSCRIPTION is logged by the server with its CONNECTION string, password included, on
    error (log_min_error_statement), on success where DDL, all statements or their durations are
    logged, and by pgaudit: keep it out of the server log where the role may change the settings.
    Each one apart, so that a setting the role may not change (preflight warns of it) leaves the
    others switched off; inside a transaction block, each behind a savepoint, so a refusal does not
    abort it."""
    in_block = conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    changed: list[str] = []
    for name, value in settings_keeping_statements(conn):
        if in_block:
            execute(conn, "SAVEPOINT zdm_log_setting")
        try:
            execute(conn, f"SET {name} = {value}")  # names and values are statement_logging's constants
            changed.append(name)
        except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.CantChangeRuntimeParam):
            # A managed server that does not let us: this one stays as configured.
            if in_block:
                execute(conn, "ROLLBACK TO SAVEPOINT zdm_log_setting")
    try:
        yield
    finally:
        # In a failed transaction the settings roll back with it (and a RESET would hide the error).
        failed = not conn.closed and conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        if changed and not conn.closed and not failed:
            execute(conn, "; ".join(f"RESET {name}" for name in changed))


@dataclass(frozen=True)
class ReplicationNames:
    """The publication, slot and subscription of one replication direction share one name."""

    base: str

    @property
    def publication(self) -> str:
        return self.base

    @property
    def slot(self) -> str:
        return self.base

    @property
    def subscription(self) -> str:
        return self.base


@dataclass(frozen=True)
class LogicalReplicationPlan:
    names: ReplicationNames
    tables: tuple[TableName, ...]
    settings: LogicalSettings = field(default_factory=LogicalSettings)
    initial_copy: bool = True
    sides: Sides = FORWARD_SIDES  # what the status's problems call the two databases


@dataclass(frozen=True)
class AddedTables:
    added: list[str]  # into the publication and the subscription: their table sync copies them now
    waiting: list[str]  # created on the source after the start, still missing on the target


class LogicalEngine(ReplicationEngine):
    name = "logical"

    def __init__(
        self,
        source_dsn: str,
        target_dsn: str,
        plan: LogicalReplicationPlan,
        *,
        subscription_conninfo: str | None = None,
        on_copy_progress: Callable[[ChunkCopied], None] | None = None,
        connector: Callable[..., Connection] = connect,
    ) -> None:
        self._source_dsn = source_dsn
        self._target_dsn = target_dsn
        # How the target server reaches the source (may differ from how we do).
        self._conninfo = with_unbounded_session(subscription_conninfo or source_dsn)
        self.plan = plan
        self._on_copy_progress = on_copy_progress
        self._connect = connector

    # -- connections -------------------------------------------------------------------
    def _source(self) -> Connection:
        return self._connect(self._source_dsn, application_name="zdm-control")

    def _target(self) -> Connection:
        # Writable while the target is fenced (from the read shift to the cutover, and after a rollback).
        conn = self._connect(self._target_dsn, application_name="zdm-control")
        make_writable(conn)
        keep_when_idle(conn)  # idle while the parallel copy runs, then it creates the subscription
        # What it records (the copy's state, indexes set aside) must survive a crash the copy rides through
        execute(conn, "SET synchronous_commit = on")
        return conn

    # -- start -------------------------------------------------------------------------
    def start(self) -> StartResult:
        names = self.plan.names
        source, target = self._source(), self._target()
        try:
            infos = self._describe(source)
            tables = _replicated_tables(infos)
            if self.plan.initial_copy:
                refuse_filtered_reads(tables, "the source")
            on_target = _describe_target(target, tables)
            sub = _subscription(target, names.subscription)
            parallel = self.plan.initial_copy and self.plan.settings.copy_method == "parallel-snapshot"
            recorded = _copy_state(target, names.slot)
            if sub is None and parallel and (recorded is None or recorded.state != "copying"):
                _require_empty(target, tables)  # refused before anything is created on either side
            self._ensure_publication(source, tables)
            if sub is not None:
                enabled = sub[1]
                if not enabled:
                    execute(target, sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(names.subscription)))
                return StartResult(self.name, already_running=enabled, tables=[str(t.name) for t in tables])
            if parallel:
                return self._start_with_parallel_copy(source, target, tables, on_target)
            return self._start_subscription(source, target, tables, copy_data=self.plan.initial_copy)
        finally:
            source.close()
            target.close()

    def publish(self) -> None:
        """The publication alone: without a slot nothing is decoded yet. The cutover makes its back
        replication's before the fence, so that waiting for table locks never lengthens the write pause;
        start() then finds it as it is."""
        source = self._source()
        try:
            self._ensure_publication(source, _replicated_tables(self._describe(source)))
        finally:
            source.close()

    def add_tables(self) -> AddedTables:
        """Tables created on the source after the start (`tables_added_after_start`) that the target has since
        been given, empty and alike: added to the publication, then the subscription refreshed with copy_data,
        so PostgreSQL's table sync copies each from a snapshot of its own and hands it to the apply worker.
        Safe to run again: a table the subscription holds is not added twice, and one a run that died left in
        the publication only is refreshed. Tables the target lacks are named as waiting; nothing else changes."""
        names = self.plan.names
        source, target = self._source(), self._target()
        try:
            sub = _subscription(target, names.subscription)
            if sub is None or not sub[1]:
                raise ReplicationSetupError(
                    f"subscription {names.subscription} is {'missing' if sub is None else 'disabled'}: tables are "
                    "added to a running replication only"
                )
            on_source = self._describe(source)
            added = tables_added_after_start(on_source, _subscription_tables(target, sub[0]))
            on_target = describe_tables(target, added)
            ready = [on_source[t] for t in added if t in on_target]
            if ready:
                found = schema_drift(on_source, on_target, [t.name for t in ready], self.plan.sides)
                if found:
                    raise ReplicationSetupError(f"{drift_problem(found, self.plan.sides)}; nothing was added")
                _require_empty(target, ready)
                published = _published_oids(source, names.publication) or set()
                unpublished = [t for t in ready if t.oid not in published]
                if unpublished:
                    run_waiting_for_locks(
                        source,
                        sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                            sql.Identifier(names.publication), sql.SQL(", ").join(_only(t) for t in unpublished)
                        ),
                        [t.oid for t in unpublished],
                        what=f"adding {join_names(t.name for t in unpublished)} to publication {names.publication}",
                        wait_seconds=self.plan.settings.lock_wait_seconds,
                    )
                execute(
                    target,
                    sql.SQL("ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = true)").format(
                        sql.Identifier(names.subscription)
                    ),
                )
            return AddedTables([str(t.name) for t in ready], [str(t) for t in added if t not in on_target])
        finally:
            source.close()
            target.close()

    def _describe(self, source: Connection) -> dict[TableName, TableInfo]:
        infos = describe_tables(source, self.plan.tables)
        missing = [str(t) for t in self.plan.tables if t not in infos]
        if missing:
            raise ReplicationSetupError(
                f"tables not found on the source: {', '.join(missing)}; fix 'tables' in the migration file"
            )
        return infos

    def _ensure_publication(self, source: Connection, tables: Sequence[TableInfo]) -> None:
        ensure_publication(
            source,
            self.plan.names.publication,
            tables,
            via_partition_root=True,
            lock_wait_seconds=self.plan.settings.lock_wait_seconds,
        )

    def _start_subscription(
        self, source: Connection, target: Connection, tables: Sequence[TableInfo], *, copy_data: bool
    ) -> StartResult:
        names = self.plan.names
        # A slot left by an interrupted start (made here, then the subscription) or CREATE SUBSCRIPTION.
        drop_slot(source, names.slot)
        if copy_data:
            _require_empty(target, tables)
        # Made here rather than by CREATE SUBSCRIPTION, which would wait blind for transactions open on the source.
        repl = self._replication_connection()
        try:
            create_logical_slot(
                repl, source, names.slot, export_snapshot=False, wait_seconds=self.plan.settings.slot_wait_seconds
            )
        finally:
            repl.close()
        self._create_subscription(source, target, copy_data=copy_data)
        return StartResult(self.name, already_running=False, tables=[str(t.name) for t in tables])

    def _replication_connection(self) -> Connection:
        return self._connect(
            self._source_dsn,
            application_name="zdm-slot",
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
        )

    def _create_subscription(self, source: Connection, target: Connection, *, copy_data: bool) -> None:
        """On the slot already made (`create_slot = false`; which may also run inside a transaction block).
        From PostgreSQL 14 on both sides, a transaction larger than the source's logical_decoding_work_mem
        is streamed to the target while it runs (`streaming = on`) instead of spilled to the source's disk
        until it commits: a bulk UPDATE of many millions of rows would otherwise fill the production
        server's pg_replslot with gigabytes."""
        names = self.plan.names
        streams = min(server_version_num(source), server_version_num(target)) >= STREAMING_VERSION
        with _statement_not_logged_on_error(target):
            execute(
                target,
                sql.SQL(
                    "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {pub}"
                    " WITH (slot_name = {slot}, create_slot = false, copy_data = {copy}, enabled = true{stream})"
                ).format(
                    stream=sql.SQL(", streaming = on" if streams else ""),
                    sub=sql.Identifier(names.subscription),
                    conn=sql.Literal(self._conninfo),
                    pub=sql.Identifier(names.publication),
                    slot=sql.Literal(names.slot),
                    copy=sql.Literal(copy_data),
                ),
            )

    def _start_with_parallel_copy(
        self,
        source: Connection,
        target: Connection,
        tables: Sequence[TableInfo],
        on_target: dict[TableName, TableInfo],
    ) -> StartResult:
        names = self.plan.names
        _ensure_state_tables(target)
        previous = fetch_one(
            target,
            sql.SQL("SELECT state FROM {}.copy_state WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)),
            (names.slot,),
        )
        if previous is not None and previous[0] == "copying":
            # An earlier start died mid-copy: its rows are ours and its snapshot is gone. Redo.
            _truncate(target, tables)
        drop_slot(source, names.slot)
        _require_empty(target, tables)
        execute(
            target,
            sql.SQL(
                "INSERT INTO {s}.copy_state (slot, state, started_at) VALUES (%s, 'copying', now())"
                " ON CONFLICT (slot) DO UPDATE SET state = 'copying', started_at = now(), finished_at = NULL,"
                " consistent_lsn = NULL"
            ).format(s=sql.Identifier(STATE_SCHEMA)),
            (names.slot,),
        )
        execute(
            target,
            sql.SQL("DELETE FROM {}.copy_chunks WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)),
            (names.slot,),
        )

        for table in tables:
            defer_indexes(target, STATE_SCHEMA, names.slot, table)
        started = time.monotonic()
        repl = self._replication_connection()
        try:
            created = create_logical_slot(
                repl, source, names.slot, export_snapshot=True, wait_seconds=self.plan.settings.slot_wait_seconds
            )
            consistent_lsn, snapshot = created.consistent_lsn, str(created.snapshot)
            chunks = self._plan_chunks(source, tables, on_target)
            execute(
                target,
                sql.SQL(
                    "INSERT INTO {s}.copy_chunks (slot, table_name, chunk_no, rows_copied, done)"
                    " SELECT %s, t, n, 0, false FROM unnest(%s::text[], %s::int[]) AS u(t, n)"
                ).format(s=sql.Identifier(STATE_SCHEMA)),
                (names.slot, [str(c.table.name) for c in chunks], [c.number for c in chunks]),
            )
            copied = copy_in_parallel(
                chunks,
                snapshot,
                CopySessionFactory(
                    open_source=lambda: self._connect(self._source_dsn, application_name="zdm-copy"),
                    open_target=lambda: self._connect(self._target_dsn, application_name="zdm-copy"),
                ),
                workers=self.plan.settings.copy_workers,
                record_chunk=self._record_chunk,
                recorded_rows=self._recorded_rows,
                on_table_copied=self._finish_table,
                on_progress=self._on_copy_progress,
                reconnect_seconds=self.plan.settings.copy_reconnect_seconds,
            )
        finally:
            repl.close()  # the exported snapshot is no longer needed once every worker imported it
        alive = self._alive(target)  # idle while the copy ran: the copy may have outlived a target restart
        try:
            return self._subscribe_after_copy(source, alive, consistent_lsn, copied, started, tables)
        finally:
            if alive is not target:
                alive.close()

    def _subscribe_after_copy(
        self,
        source: Connection,
        target: Connection,
        consistent_lsn: str,
        copied: Sequence[ChunkCopied],
        started: float,
        tables: Sequence[TableInfo],
    ) -> StartResult:
        names = self.plan.names
        # The subscription is created only while this copy's record stands, under its row lock: a teardown
        # deletes the record first, so one that ran during the copy is not undone by a subscription created
        # after it, and one that comes now waits for us and then drops what we created.
        execute(target, "BEGIN")
        try:
            mine = fetch_value(
                target,
                sql.SQL("SELECT state FROM {}.copy_state WHERE slot = %s FOR UPDATE").format(
                    sql.Identifier(STATE_SCHEMA)
                ),
                (names.slot,),
            )
            if mine != "copying":
                raise ReplicationSetupError(
                    f"the copy of {names.slot} was torn down while it ran: no subscription was created; start again"
                )
            self._create_subscription(source, target, copy_data=False)
            execute(
                target,
                sql.SQL(
                    "UPDATE {}.copy_state SET state = 'done', finished_at = now(), consistent_lsn = %s WHERE slot = %s"
                ).format(sql.Identifier(STATE_SCHEMA)),
                (consistent_lsn, names.slot),
            )
            execute(target, "COMMIT")
        except BaseException:
            if not target.closed:
                execute(target, "ROLLBACK")
            raise
        return StartResult(
            self.name,
            already_running=False,
            tables=[str(t.name) for t in tables],
            rows_copied=sum(c.rows for c in copied),
            copy_seconds=time.monotonic() - started,
            consistent_lsn=consistent_lsn,
        )

    def _plan_chunks(
        self, source: Connection, tables: Sequence[TableInfo], on_target: dict[TableName, TableInfo]
    ) -> list[CopyChunk]:
        chunk_rows = self.plan.settings.copy_chunk_rows
        chunks: list[CopyChunk] = []
        for table in tables:
            # Binary COPY carries each type's own wire form: a widened target column (integer -> bigint)
            # rejects it ('insufficient data left in message'), so such tables are copied as text.
            target_types = {c.name: c.type for c in on_target[table.name].columns}
            binary = all(target_types.get(c.name, c.type) == c.type for c in table.columns if not c.generated)
            ranges = plan_ranges(source, table, chunk_rows)
            # Bytes (table + indexes) estimate a chunk's cost better than rows: wide rows and
            # random-key indexes cost more per row. Largest first keeps the tail short.
            per_chunk = max(1, table.size_bytes // len(ranges))
            chunks += [CopyChunk(table, i, r, per_chunk, binary) for i, r in enumerate(ranges)]
        return chunks

    def _record_chunk(self, target: Connection, chunk: CopyChunk, rows: int) -> None:
        execute(
            target,
            sql.SQL(
                "UPDATE {}.copy_chunks SET rows_copied = %s, done = true WHERE slot = %s AND table_name = %s AND chunk_no = %s"
            ).format(sql.Identifier(STATE_SCHEMA)),
            (rows, self.plan.names.slot, str(chunk.table.name), chunk.number),
        )

    def _alive(self, target: Connection) -> Connection:
        """`target`, or a new control session in its place when the server went away meanwhile (waiting for
        it up to `copy_reconnect_seconds`: the copy is done, and a failed start would copy again)."""
        try:
            fetch_value(target, "SELECT 1")
            return target
        except psycopg2.Error as exc:
            if not connection_lost(exc):
                raise
        target.close()
        return when_reachable(self._target, self.plan.settings.copy_reconnect_seconds)

    def _recorded_rows(self, target: Connection, chunk: CopyChunk) -> int | None:
        """The rows a chunk's committed copy recorded (`_record_chunk`), or None when it has not committed."""
        row = fetch_one(
            target,
            sql.SQL(
                "SELECT rows_copied FROM {}.copy_chunks WHERE slot = %s AND table_name = %s AND chunk_no = %s AND done"
            ).format(sql.Identifier(STATE_SCHEMA)),
            (self.plan.names.slot, str(chunk.table.name), chunk.number),
        )
        return None if row is None else int(row[0])

    def _finish_table(self, target: Connection, table: TableInfo) -> None:
        """A table's rows are all in: build its deferred indexes, then gather planner statistics."""
        restore_indexes(target, STATE_SCHEMA, self.plan.names.slot, table.name)
        execute(target, sql.SQL("ANALYZE {}").format(table.name.ident))

    # -- status ------------------------------------------------------------------------
    def status(self) -> ReplicationStatus:
        names = self.plan.names
        source, target = self._source(), self._target()
        try:
            slot = slot_health(source, names.slot)
            source_lsn = Lsn.parse(fetch_value(source, "SELECT pg_current_wal_lsn()::text"))
            sub = _subscription(target, names.subscription)
            copy_state = _copy_state(target, names.slot)
            problems: list[str] = []
            if slot.lost:
                problems.append(
                    f"slot {names.slot} on the {self.plan.sides.publisher} lost its WAL (max_slot_wal_keep_size "
                    "exceeded): replication cannot continue; "
                    "tear down and start again"
                )
            if sub is None:
                if copy_state is not None and copy_state.state == "copying":
                    return ReplicationStatus(
                        self.name,
                        Phase.COPYING,
                        copy_state.tables,
                        source_lsn=str(source_lsn),
                        slot=slot,
                        problems=problems,
                    )
                return ReplicationStatus(
                    self.name, Phase.NOT_STARTED, source_lsn=str(source_lsn), slot=slot, problems=problems
                )
            _, enabled, worker_running = sub
            tables = _subscription_tables(target, sub[0])
            if copy_state is not None:
                copied = {t.table: t for t in copy_state.tables}
                tables = [
                    TableStatus(
                        t.table,
                        t.state,
                        copied[t.table].rows_copied,
                        copied[t.table].chunks_total,
                        copied[t.table].chunks_done,
                    )
                    if t.table in copied
                    else t
                    for t in tables
                ]
            applied = applied_lsn(target, names.subscription)
            replay_lsn, replay_lag = _walsender(source, names.slot)
            if replay_lsn is not None:
                lag_bytes: int | None = max(0, source_lsn - replay_lsn)
            elif slot.exists:
                confirmed = fetch_value(
                    source,
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                    (names.slot,),
                )
                lag_bytes = max(0, source_lsn - Lsn.parse(confirmed)) if confirmed else None
            else:
                lag_bytes = None
            lag_seconds: float | None
            if replay_lag is not None:
                lag_seconds = replay_lag
            elif replay_lsn is not None:
                lag_seconds = 0.0  # caught up and idle: PostgreSQL clears replay_lag
            else:
                lag_seconds = None
            if enabled and not worker_running:
                errors = _apply_errors(target, sub[0])
                problems.append(
                    f"subscription {names.subscription} is enabled but its apply worker is not running"
                    + (f" ({errors} apply error(s) so far)" if errors else "")
                    + f"; see the {self.plan.sides.subscriber}'s log"
                )
            if enabled and not slot.exists:
                problems.append(f"slot {names.slot} is missing on the {self.plan.sides.publisher}")
            on_source = describe_tables(source, self.plan.tables)
            added = tables_added_after_start(on_source, tables)
            on_target = describe_tables(target, added) if added else {}
            addable = addable_tables(target, on_source, on_target, added, self.plan.sides)
            unpublished = [t for t in unpublished_tables(source, names.publication, self.plan.tables) if t not in added]
            if unpublished:
                problems.append(unpublished_problem(unpublished, names.publication, self.plan.sides))
            if added:
                problems.append(added_tables_problem(added, set(on_target), addable, self.plan.sides))
            problems += schema_drift_problems(source, target, self.plan.tables, self.plan.sides, on_source=on_source)
            if slot.lost or (enabled and not slot.exists):
                phase = Phase.FAILED  # no change can flow any more: never 'streaming'
            elif not enabled:
                phase = Phase.STOPPED
            elif any(t.state is not TableSyncState.READY for t in tables):
                phase = Phase.COPYING
            else:
                phase = Phase.STREAMING
            return ReplicationStatus(
                self.name,
                phase,
                tables,
                lag_bytes=lag_bytes,
                lag_seconds=lag_seconds,
                source_lsn=str(source_lsn),
                applied_lsn=str(applied) if applied else None,
                slot=slot,
                problems=problems,
                tables_to_add=[str(t) for t in addable],
            )
        finally:
            source.close()
            target.close()

    # -- stop / teardown -----------------------------------------------------------------
    def stop(self) -> None:
        target = self._target()
        try:
            sub = _subscription(target, self.plan.names.subscription)
            if sub is not None and sub[1]:
                execute(
                    target,
                    sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(self.plan.names.subscription)),
                )
        finally:
            target.close()

    def teardown(self) -> TeardownResult:
        names = self.plan.names
        removed: list[str] = []
        target = self._target()
        try:
            # The copy record goes first: a start still copying then creates no subscription after us (or,
            # holding the record, makes us wait, and its subscription is dropped below).
            if fetch_value(target, "SELECT to_regclass(%s)", (f"{STATE_SCHEMA}.copy_state",)) is not None:
                execute(
                    target,
                    sql.SQL("DELETE FROM {}.copy_state WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)),
                    (names.slot,),
                )
            if _subscription(target, names.subscription) is not None:
                sub = sql.Identifier(names.subscription)
                execute(target, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sub))
                # Detach the slot so DROP SUBSCRIPTION does not need the source; we drop it below.
                execute(target, sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sub))
                execute(target, sql.SQL("DROP SUBSCRIPTION {}").format(sub))
                removed.append(f"subscription {names.subscription}")
            if fetch_value(target, "SELECT to_regclass(%s)", (f"{STATE_SCHEMA}.copy_state",)):
                restored = restore_indexes(target, STATE_SCHEMA, names.slot, None)
                removed += [f"(restored {name})" for name in restored]
                execute(
                    target,
                    sql.SQL("DELETE FROM {}.copy_chunks WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)),
                    (names.slot,),
                )
                execute(
                    target,
                    sql.SQL("DELETE FROM {}.copy_state WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)),
                    (names.slot,),
                )
        finally:
            target.close()
        source = self._source()
        try:
            if drop_slot(source, names.slot):
                removed.append(f"slot {names.slot}")
            if fetch_value(source, "SELECT 1 FROM pg_publication WHERE pubname = %s", (names.publication,)):
                execute(source, sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(names.publication)))
                removed.append(f"publication {names.publication}")
        finally:
            source.close()
        return TeardownResult(removed)


# -- helpers (module level: each is one query or one small step) ----------------------------


def _replicated_tables(infos: dict[TableName, TableInfo]) -> list[TableInfo]:
    """Selected tables minus partitions with a selected partitioned ancestor at any level (they replicate,
    and are copied, through it: copying them too would copy their rows twice). Inheritance children of a
    plain table stay: they are tables of their own."""
    partitioned = {info.oid for info in infos.values() if info.relkind == "p"}
    return [info for name, info in sorted(infos.items()) if not (partitioned & set(info.ancestor_oids))]


def refuse_filtered_reads(tables: Sequence[TableInfo], side: str) -> None:
    """Refuses to copy what row-level security hides from the reading role: PostgreSQL filters a COPY or
    SELECT silently, so the target would lack the hidden rows and nothing would say so."""
    filtered = [str(t.name) for t in tables if t.row_security_active]
    if filtered:
        raise ReplicationSetupError(
            f"row-level security policies hide rows of {', '.join(filtered)} from this role on {side}: a copy "
            "would silently leave them behind; give the role BYPASSRLS or connect as the tables' owner "
            "(preflight's row_level_security check says how)"
        )


def _describe_target(target: Connection, tables: Sequence[TableInfo]) -> dict[TableName, TableInfo]:
    """The selected tables on the target; refuses what the copy and the apply worker cannot fill
    exactly: a missing table, or a column generated on one side only (neither the copy nor
    replication carries generated values: a plain target column would stay NULL)."""
    on_target = describe_tables(target, [t.name for t in tables])
    problems = [f"{t.name}: missing on the target" for t in tables if t.name not in on_target]
    for table in tables:
        other = {c.name: c for c in on_target[table.name].columns} if table.name in on_target else {}
        for column in table.columns:
            twin = other.get(column.name)
            if twin is not None and twin.generated != column.generated:
                side = "source" if column.generated else "target"
                problems.append(f"{table.name}.{column.name}: a generated column on the {side} only")
    if problems:
        raise ReplicationSetupError(
            f"the target cannot receive these tables exactly: {'; '.join(problems)}; create them as on the source "
            "(preflight's target_schema check lists every difference)"
        )
    return on_target


def ensure_publication(
    source: Connection,
    name: str,
    tables: Sequence[TableInfo],
    *,
    via_partition_root: bool,
    lock_wait_seconds: float,
) -> None:
    """Publication `name` holds exactly `tables` (partitioned ones through their root when `via_partition_root`).

    CREATE and ALTER PUBLICATION take a SHARE UPDATE EXCLUSIVE lock on each table: a VACUUM, ANALYZE or
    CREATE INDEX holding one would make them wait blind, so each attempt waits 2 s at most and the whole
    at most `lock_wait_seconds` (`table_locks.run_waiting_for_locks`, naming the holders). A publication
    already holding exactly these tables is left alone: altering it would only take their locks again."""
    pub = sql.Identifier(name)
    table_list = sql.SQL(", ").join(_only(t) for t in tables)
    published = _published_oids(source, name)
    if published == {t.oid for t in tables}:
        return
    exists = published is not None
    options = sql.SQL(" WITH (publish_via_partition_root = true)") if via_partition_root else sql.SQL("")
    statement = (
        sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(pub, table_list)
        if exists
        else sql.SQL("CREATE PUBLICATION {} FOR TABLE {}{}").format(pub, table_list, options)
    )
    run_waiting_for_locks(
        source,
        statement,
        [t.oid for t in tables],
        what=f"{'altering' if exists else 'creating'} publication {name}",
        wait_seconds=lock_wait_seconds,
    )


def _only(table: TableInfo) -> sql.Composable:
    """The table itself: a plain table's inheritance children are tables of their own (selected or not)."""
    return sql.SQL("ONLY {}").format(table.name.ident) if table.relkind == "r" else table.name.ident


def _subscription(target: Connection, name: str) -> tuple[int, bool, bool] | None:
    row = fetch_one(
        target,
        "SELECT s.oid, s.subenabled, EXISTS (SELECT 1 FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.relid IS NULL"
        " AND w.pid IS NOT NULL) FROM pg_subscription s"
        " WHERE s.subname = %s AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (name,),
    )
    return (int(row[0]), bool(row[1]), bool(row[2])) if row else None


def _apply_errors(target: Connection, sub_oid: int) -> int | None:
    """Apply and table-sync errors counted since the subscription began (PostgreSQL 15+; None before): a
    worker that fails on the same change again and again is down only between its retries."""
    if server_version_num(target) < 150000:
        return None
    row = fetch_one(
        target,
        "SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats WHERE subid = %s",
        (sub_oid,),
    )
    return int(row[0]) if row else 0


def _subscription_tables(target: Connection, sub_oid: int) -> list[TableStatus]:
    rows = fetch_all(
        target,
        "SELECT n.nspname || '.' || c.relname, r.srsubstate FROM pg_subscription_rel r"
        " JOIN pg_class c ON c.oid = r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE r.srsubid = %s ORDER BY 1",
        (sub_oid,),
    )
    return [TableStatus(name, _SUBSCRIPTION_STATES.get(state, TableSyncState.PENDING)) for name, state in rows]


@dataclass(frozen=True)
class _CopyState:
    state: str
    tables: list[TableStatus]


def _copy_state(target: Connection, slot: str) -> _CopyState | None:
    if not fetch_value(target, "SELECT to_regclass(%s)", (f"{STATE_SCHEMA}.copy_state",)):
        return None
    row = fetch_one(
        target, sql.SQL("SELECT state FROM {}.copy_state WHERE slot = %s").format(sql.Identifier(STATE_SCHEMA)), (slot,)
    )
    if row is None:
        return None
    rows = fetch_all(
        target,
        sql.SQL(
            "SELECT table_name, count(*), count(*) FILTER (WHERE done), sum(rows_copied) FROM {}.copy_chunks"
            " WHERE slot = %s GROUP BY table_name ORDER BY table_name"
        ).format(sql.Identifier(STATE_SCHEMA)),
        (slot,),
    )
    tables = []
    for name, total, done, rows_copied in rows:
        state = TableSyncState.COPIED if done == total else (TableSyncState.COPYING if done else TableSyncState.PENDING)
        if row[0] == "done":
            state = TableSyncState.READY
        tables.append(TableStatus(name, state, int(rows_copied or 0), int(total), int(done)))
    return _CopyState(row[0], tables)


def _ensure_state_tables(target: Connection) -> None:
    schema = sql.Identifier(STATE_SCHEMA)
    execute(target, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    execute(
        target,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.copy_state (slot text PRIMARY KEY, state text NOT NULL,"
            " started_at timestamptz, finished_at timestamptz, consistent_lsn pg_lsn)"
        ).format(schema),
    )
    execute(
        target,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.copy_chunks (slot text, table_name text, chunk_no int,"
            " rows_copied bigint NOT NULL DEFAULT 0, done boolean NOT NULL DEFAULT false,"
            " PRIMARY KEY (slot, table_name, chunk_no))"
        ).format(schema),
    )
    ensure_deferred_table(target, STATE_SCHEMA)


# Selected tables whose changes the publication no longer carries: neither in it nor below a table in it
# (a partition of a published root). A table dropped and created again (an ETL job's rebuild) leaves it.
_UNPUBLISHED = """
WITH RECURSIVE published AS (
    SELECT pr.prrelid AS relid FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
     WHERE p.pubname = %(publication)s
    UNION
    SELECT h.inhrelid FROM pg_inherits h JOIN published ON h.inhparent = published.relid
      JOIN pg_class k ON k.oid = h.inhrelid WHERE k.relispartition
)
SELECT w.s, w.t FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS w(s, t, n)
 WHERE NOT EXISTS (
       SELECT 1 FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
        WHERE ns.nspname = w.s AND c.relname = w.t AND c.oid IN (SELECT relid FROM published))
 ORDER BY w.n
"""


def _published_oids(source: Connection, publication: str) -> set[int] | None:
    """The tables the publication holds, or None when there is no such publication."""
    oids = fetch_value(
        source,
        "SELECT array(SELECT r.prrelid::bigint FROM pg_publication_rel r WHERE r.prpubid = p.oid)"
        " FROM pg_publication p WHERE p.pubname = %s",
        (publication,),
    )
    return None if oids is None else {int(o) for o in oids}


def unpublished_tables(source: Connection, publication: str, tables: Sequence[TableName]) -> list[TableName]:
    """The selected tables the publication does not carry any more, in the plan's order."""
    rows = fetch_all(
        source,
        _UNPUBLISHED,
        {"publication": publication, "schemas": [t.schema for t in tables], "names": [t.name for t in tables]},
    )
    return [TableName(str(schema), str(name)) for schema, name in rows]


def schema_drift_problems(
    source: Connection,
    target: Connection,
    tables: Sequence[TableName],
    sides: Sides = FORWARD_SIDES,
    *,
    on_source: Mapping[TableName, TableInfo] | None = None,
) -> list[str]:
    """One problem naming how the selected tables' definitions came apart after the start (DDL is not
    replicated): columns, types and keys (`schema_drift`), and partitions the source added (`partitions_missing`).
    `on_source`: the tables as the caller already described them on the source."""
    on_source = on_source if on_source is not None else describe_tables(source, tables)
    roots = [name for name, info in on_source.items() if info.relkind == "p"]
    found = schema_drift(on_source, describe_tables(target, tables), tables, sides)
    found += partitions_missing(partition_trees(source, roots), partition_trees(target, roots), sides)
    return [drift_problem(found, sides)] if found else []


def tables_added_after_start(
    on_source: Mapping[TableName, TableInfo], subscribed: Sequence[TableStatus]
) -> list[TableName]:
    """Selected tables (as replicated: partitions through their partitioned root) that the subscription does
    not hold: created on the source after the start (or selected since), so nothing of them is replicated."""
    known = {t.table for t in subscribed}
    return [t.name for t in _replicated_tables(dict(on_source)) if str(t.name) not in known]


def addable_tables(
    target: Connection,
    on_source: Mapping[TableName, TableInfo],
    on_target: Mapping[TableName, TableInfo],
    added: Sequence[TableName],
    sides: Sides = FORWARD_SIDES,
) -> list[TableName]:
    """Of the tables created after the start, those `add_tables` would add now: on the target, alike (no
    blocking difference) and empty there."""
    alike = [
        t for t in added if t in on_target and not schema_drift(on_source, on_target, [t], sides) and t in on_source
    ]
    full = set(_tables_with_rows(target, [on_target[t] for t in alike]))
    return [t for t in alike if t not in full]


def added_tables_problem(
    added: Sequence[TableName],
    on_target: set[TableName],
    addable: Sequence[TableName] = (),
    sides: Sides = FORWARD_SIDES,
) -> str:
    """Tables created after the start: what replicates none of their rows yet, and what adds them."""
    waiting = [t for t in added if t not in on_target]
    held = [t for t in added if t in on_target and t not in addable]
    text = (
        f"{join_names(added)}: created on the {sides.publisher} after the start, not replicated yet; the migration "
        "adds such a table while it waits for the copy (`add_tables`: its rows copied by PostgreSQL's table sync, "
        "then streamed), not once reads have moved"
    )
    if waiting:
        text += (
            f"; first create {join_names(waiting)} on the {sides.subscriber} as on the {sides.publisher} "
            f"(pg_dump --schema-only --table=...)"
        )
    if held:
        text += (
            f"; {join_names(held)} must first be alike on both sides (see the schema differences) and empty on the "
            f"{sides.subscriber}"
        )
    return text


def unpublished_problem(tables: Sequence[TableName], publication: str, sides: Sides = FORWARD_SIDES) -> str:
    return (
        f"{', '.join(map(str, tables))} no longer in publication {publication} (dropped, or dropped and created "
        f"again, on the {sides.publisher}): its changes are not replicated and the {sides.subscriber} keeps the old "
        "rows; tear down and start again to copy it anew"
    )


def slot_health(source: Connection, slot: str) -> SlotHealth:
    row = fetch_one(
        source,
        "SELECT active, wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, safe_wal_size"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    if row is None:
        return SlotHealth(slot, exists=False)
    active, wal_status, retained, safe = row
    return SlotHealth(
        slot,
        True,
        bool(active),
        wal_status,
        None if retained is None else int(retained),
        None if safe is None else int(safe),
    )


def _walsender(source: Connection, slot: str) -> tuple[Lsn | None, float | None]:
    row = fetch_one(
        source,
        "SELECT r.replay_lsn::text, extract(epoch FROM r.replay_lag)::float8 FROM pg_stat_replication r"
        " JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
        (slot,),
    )
    if row is None or row[0] is None:
        return None, None
    return Lsn.parse(row[0]), row[1]


def drop_slot(source: Connection, slot: str, wait_seconds: float = 10.0) -> bool:
    """Drop the slot if it exists, ending a walsender that still holds it. True if it existed."""
    deadline = time.monotonic() + wait_seconds
    while True:
        row = fetch_one(source, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        if row is None:
            return False
        if row[0] is None:
            try:
                execute(source, "SELECT pg_drop_replication_slot(%s)", (slot,))
                return True
            except psycopg2.errors.ObjectInUse:
                pass  # it became active between our look and the drop
            except psycopg2.errors.UndefinedObject:
                return False
        else:
            execute(source, "SELECT pg_terminate_backend(%s)", (row[0],))
        if time.monotonic() > deadline:
            raise ReplicationSetupError(f"slot {slot} stays in use on the source; end the session using it and retry")
        time.sleep(0.05)


def _tables_with_rows(target: Connection, tables: Sequence[TableInfo]) -> list[TableName]:
    return [t.name for t in tables if fetch_value(target, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(_only(t)))]


def _require_empty(target: Connection, tables: Sequence[TableInfo]) -> None:
    full = [str(t) for t in _tables_with_rows(target, tables)]
    if full:
        raise ReplicationSetupError(
            f"target tables already hold rows: {', '.join(full)}; the initial copy needs them empty "
            "(truncate them on the target, or exclude them in the migration file)"
        )


def _truncate(target: Connection, tables: Sequence[TableInfo]) -> None:
    execute(target, sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(_only(t) for t in tables)))
