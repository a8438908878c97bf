"""The Debezium engine: change events through Kafka, applied to the target by the idempotent applier.

The connector (MSK Connect on AWS, the embedded engine locally) snapshots the selected tables and
then streams from its own slot; the applier (lambdas/core/changestream/applier.py) keeps its
offsets and progress on the target. This class drives the runtime and reads both sides:
progress, lag, dead letters, and, at cutover, whether everything before the fence is applied.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg2 import sql

from lambdas.core.catalog import TableInfo, describe_tables
from lambdas.core.changestream import state
from lambdas.core.changestream.connector import FENCE_PREFIX, heartbeat_topic, message_topic, table_topic
from lambdas.core.changestream.kafka import KafkaStream, TopicOffsets
from lambdas.core.changestream.runtime import ChangeStreamRuntime, PartState
from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_one, fetch_value
from lambdas.core.engines.base import (
    FenceReached,
    Phase,
    ReplicationEngine,
    ReplicationStatus,
    StartResult,
    TableStatus,
    TableSyncState,
    TeardownResult,
)
from lambdas.core.engines.logical import (
    drop_slot,
    ensure_publication,
    refuse_filtered_reads,
    schema_drift_problems,
    slot_health,
    unpublished_problem,
    unpublished_tables,
)
from lambdas.core.fence import Backend, make_writable, sessions_of
from lambdas.core.lsn import Lsn, current_lsn
from lambdas.core.tables import TableName

# Debezium's PostgresConnection names its JDBC sessions "Debezium General", "Debezium Heartbeat", ...
DEBEZIUM_SESSIONS = "Debezium %"


class ChangeStreamBehind(TimeoutError):
    """The applier did not reach the fence in time (the cutover aborts and lifts the fence)."""


@dataclass(frozen=True)
class DebeziumPlan:
    prefix: str
    slot: str
    publication: str
    tables: tuple[TableName, ...]
    connector: Mapping[str, str]  # the connector's settings (hold the password or its reference)
    lock_wait_seconds: float = 120.0  # making the publication waits this long for the tables' locks at most

    @property
    def table_topics(self) -> list[str]:
        return [table_topic(self.prefix, t) for t in self.tables]

    @property
    def applier_topics(self) -> list[str]:
        """What the applier consumes: the table topics and the heartbeats (StreamRouting.topics)."""
        return [*self.table_topics, heartbeat_topic(self.prefix)]


class DebeziumEngine(ReplicationEngine):
    name = "debezium"

    def __init__(
        self,
        source_dsn: str,
        target_dsn: str,
        plan: DebeziumPlan,
        runtime: ChangeStreamRuntime,
        kafka: KafkaStream,
    ) -> None:
        self._source_dsn = source_dsn
        self._target_dsn = target_dsn
        self.plan = plan
        self.runtime = runtime
        self.kafka = kafka

    def _target(self) -> Connection:
        """A control session on the target that may write its state, also while the target is fenced
        (from the read shift to the cutover, and after a rollback)."""
        conn = connect(self._target_dsn)
        make_writable(conn)
        return conn

    def start(self) -> StartResult:
        already = self.runtime.health().running
        infos = self._describe_source()
        target = self._target()
        try:
            # Not the state tables' existence: a start that died after creating them, before seeding the
            # offsets, would make its retry skip the seeding and replay an earlier run's events.
            started_before = _has_state(target) and state.offsets_seeded(target)
            left_over: TopicOffsets = {}
            if not started_before:
                refuse_filtered_reads(list(infos.values()), "the source")  # the connector snapshots as this role
                _require_empty(target, self.plan.tables)
                # Topics of an earlier run with this name (torn down, started again) still hold its
                # events: this run's applier starts after them, or it would replay them onto the new
                # target and then skip the new snapshot as republished.
                left_over = self.kafka.end_offsets(self.plan.applier_topics)
            state.ensure_state_tables(target)
            state.set_applier_paused(target, False)  # a stop or an undone cutover paused it
            if not started_before:
                state.seed_offsets_once(target, left_over)
            # Each table's columns on the source, generated ones aside (Debezium does not send those).
            columns = {str(name): [c.name for c in info.columns if not c.generated] for name, info in infos.items()}
            state.record_source_columns(target, columns)
        finally:
            target.close()
        self._ensure_publication(list(infos.values()))
        self.runtime.start(self.plan.connector, self.plan.table_topics)
        return StartResult(self.name, already, [str(t) for t in self.plan.tables])

    def _ensure_publication(self, tables: list[TableInfo]) -> None:
        """Made here, not by the connector (publication.autocreate.mode disabled): its CREATE or ALTER
        PUBLICATION would wait blind for a lock on a table (a VACUUM, a CREATE INDEX), while this one waits
        `lock_wait_seconds` at most and names the sessions holding them."""
        source = connect(self._source_dsn)
        try:
            make_writable(source)  # a start again after an undone cutover may find the source fenced
            ensure_publication(
                source,
                self.plan.publication,
                tables,
                via_partition_root=False,  # as the connector's own publication: each partition's topic
                lock_wait_seconds=self.plan.lock_wait_seconds,
            )
        finally:
            source.close()

    def _describe_source(self) -> dict[TableName, TableInfo]:
        source = connect(self._source_dsn)
        try:
            return describe_tables(source, self.plan.tables)
        finally:
            source.close()

    def status(self) -> ReplicationStatus:
        health = self.runtime.health()
        problems = list(health.problems)
        target = self._target()
        try:
            if not _has_state(target):
                return ReplicationStatus(self.name, Phase.NOT_STARTED, problems=problems)
            progress = _table_progress(target)
            completed = bool(
                fetch_value(target, _q("SELECT coalesce(bool_or(snapshot_completed), false) FROM {}.dbz_stream"))
            )
            dead_letters = int(fetch_value(target, _q("SELECT count(*) FROM {}.dbz_dead_letters")))
            partitions = fetch_all(
                target,
                _q("SELECT topic, kafka_partition, next_offset, last_source_lsn, last_ts_ms FROM {}.dbz_partitions"),
            )
            added = tables_not_captured(self.plan.tables, state.source_columns(target))
            try:
                ends = self.kafka.end_offsets(self.plan.table_topics)
            except Exception as exc:
                ends = {}
                problems.append(f"cannot read the broker's offsets: {exc}")
            source = connect(self._source_dsn)
            try:
                now_lsn = current_lsn(source)
                slot = slot_health(source, self.plan.slot)
                confirmed = fetch_value(
                    source,
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                    (self.plan.slot,),
                )
                # Made by the start (`_ensure_publication`): missing before it.
                published = fetch_value(
                    source, "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.plan.publication,)
                )
                unpublished = [
                    t
                    for t in (unpublished_tables(source, self.plan.publication, self.plan.tables) if published else [])
                    if t not in added
                ]
                # the applier dead-letters the changes it cannot write until the target is altered too
                drift = schema_drift_problems(source, target, self.plan.tables)
            finally:
                source.close()
        finally:
            target.close()
        if unpublished:
            problems.append(unpublished_problem(unpublished, self.plan.publication))
        if added:
            problems.append(not_captured_problem(added))
        problems += drift
        applied = {(t, p): off for t, p, off, _, _ in partitions}
        pending_by_topic: dict[str, int] = {}
        for (topic, part), end in ends.items():
            pending_by_topic[topic] = pending_by_topic.get(topic, 0) + max(0, end - applied.get((topic, part), 0))
        pending = sum(pending_by_topic.values()) if ends else None
        last_lsn = max((int(r[3]) for r in partitions if r[3] is not None), default=None)
        pending_ts = [int(r[4]) for r in partitions if r[4] is not None and pending_by_topic.get(r[0], 0) > 0]

        applied_lsn = last_lsn
        if pending == 0 and confirmed is not None:  # all the connector confirmed is applied
            applied_lsn = max(applied_lsn or 0, Lsn.parse(confirmed).value)
        lag_bytes = max(0, now_lsn.value - applied_lsn) if applied_lsn is not None else None
        if pending == 0 and completed:
            lag_seconds: float | None = 0.0
        elif pending_ts:
            lag_seconds = max(0.0, time.time() - min(pending_ts) / 1000.0)
        else:
            lag_seconds = None

        if health.connector is PartState.FAILED or health.applier is PartState.FAILED:
            phase = Phase.FAILED
        elif health.connector is PartState.PAUSED and health.applier is PartState.PAUSED:
            phase = Phase.STOPPED
        elif completed:
            phase = Phase.STREAMING
        else:
            phase = Phase.COPYING
        tables = []
        for table in self.plan.tables:
            rows, done = progress.get(str(table), (0, False))
            topic_pending = pending_by_topic.get(table_topic(self.plan.prefix, table), 0)
            if done or (completed and topic_pending == 0):
                table_state = TableSyncState.READY
            elif completed:
                table_state = TableSyncState.COPIED
            else:
                table_state = TableSyncState.COPYING if rows else TableSyncState.PENDING
            tables.append(TableStatus(str(table), table_state, rows_copied=rows))
        return ReplicationStatus(
            self.name,
            phase,
            tables,
            lag_bytes=lag_bytes,
            lag_seconds=lag_seconds,
            source_lsn=str(now_lsn),
            applied_lsn=str(Lsn(applied_lsn)) if applied_lsn is not None else None,
            slot=slot,
            problems=problems,
            dead_letters=dead_letters,
            pending_events=pending,
        )

    def stop(self) -> None:
        self.pause_applying()
        self.runtime.stop()

    def pause_applying(self) -> None:
        """No change is applied after this returns (the batch in flight has committed), whatever runs the
        applier; the connector and the applier keep running, so resuming is immediate (`start`)."""
        target = self._target()
        try:
            if _has_state(target):
                state.set_applier_paused(target, True)
        finally:
            target.close()

    def teardown(self) -> TeardownResult:
        removed = self.runtime.teardown()
        source = connect(self._source_dsn)
        try:
            make_writable(source)  # after the cutover the source is fenced (read-only); this is our own cleanup
            if drop_slot(source, self.plan.slot):
                removed.append(f"slot {self.plan.slot}")
            if fetch_one(source, "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.plan.publication,)):
                with source.cursor() as cur:
                    cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.plan.publication)))
                removed.append(f"publication {self.plan.publication}")
        finally:
            source.close()
        target = self._target()
        try:
            if _has_state(target):
                letters = int(fetch_value(target, _q("SELECT count(*) FROM {}.dbz_dead_letters")))
                # dead letters are evidence: kept until someone has looked at them
                removed += state.drop_state_tables(target, keep=["dbz_dead_letters"] if letters else [])
        finally:
            target.close()
        return TeardownResult(removed)

    def own_source_sessions(self, source: Connection) -> list[Backend]:
        """The connector's JDBC sessions on the source (its connection probes, heartbeats and schema reads;
        the slot's walsender is no client session): those of the role its walsender runs as (its settings
        may hold only a reference to a secret) that Debezium names ("Debezium General", ...); none while
        the slot has no walsender. The cutover's fence leaves them to its catch-up, which ends them before
        its marker (`CutoverRunner`)."""
        role = fetch_value(
            source,
            "SELECT a.usename FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid"
            " WHERE s.slot_name = %s",
            (self.plan.slot,),
        )
        return sessions_of(source, str(role), DEBEZIUM_SESSIONS) if role is not None else []

    def catch_up(self, timeout: float) -> FenceReached:
        """Wait until the target has applied everything the source committed so far (the same marker as
        the cutover's, on a session of its own; the source need not be fenced)."""
        source = connect(self._source_dsn, application_name="zdm-catch-up")
        try:
            make_writable(source)  # the marker is a (tiny) write, whatever the session defaults say
            return self.wait_for_fence(source, timeout)
        finally:
            source.close()

    def wait_for_fence(self, source: Connection, timeout: float) -> FenceReached:
        """After the fence: true once every change committed before it is applied on the target.

        A logical decoding message is written after the fence; the connector
        publishes it only after every earlier change was acknowledged by the broker. Once it is
        seen, each table topic's end offset bounds what must be applied, and the applier's
        offsets on the target must reach them.
        """
        started = time.monotonic()
        deadline = started + timeout
        marker_topic = message_topic(self.plan.prefix)
        # Only fence markers reach this topic (heartbeat messages are excluded): read it from the start.
        before: TopicOffsets = {}
        token = uuid.uuid4().hex
        # Transactional and committed synchronously: the commit flushes the WAL, so the walsender sends
        # it at once (a non-transactional message can sit unflushed on an idle, fenced source).
        execute(source, "SET synchronous_commit = on")
        marker_lsn = fetch_value(
            source,
            "SELECT pg_logical_emit_message(true, %s, %s)::text",
            (FENCE_PREFIX, token),
        )
        # Debezium hex-encodes a message's content
        if not self.kafka.wait_for_message(marker_topic, before, token.encode().hex().encode(), timeout):
            raise ChangeStreamBehind(f"the connector did not publish the fence marker within {timeout:g} s")
        marker_seen = time.monotonic() - started
        ends = self.kafka.end_offsets(self.plan.table_topics)
        target = self._target()
        try:
            while True:
                stored = state.stored_offsets(target, self.plan.table_topics)
                behind = _behind(ends, stored)
                if not behind:
                    return FenceReached(
                        str(marker_lsn),
                        time.monotonic() - started,
                        {f"{t}/{p}": o for (t, p), o in ends.items()},
                        marker_seen,
                    )
                if time.monotonic() > deadline:
                    raise ChangeStreamBehind(
                        f"the applier is {sum(behind.values())} event(s) short of the fence after {timeout:g} s"
                    )
                time.sleep(0.005)
        finally:
            target.close()


def _behind(ends: TopicOffsets, stored: TopicOffsets) -> dict[tuple[str, int], int]:
    return {k: end - stored.get(k, 0) for k, end in ends.items() if stored.get(k, 0) < end}


def _q(template: str) -> sql.Composable:
    return sql.SQL(template).format(sql.Identifier(state.SCHEMA))


def tables_not_captured(tables: Sequence[TableName], recorded: Mapping[str, object]) -> list[TableName]:
    """Selected tables the start did not record (its connector's table list): created on the source since."""
    return [t for t in tables if str(t) not in recorded] if recorded else []


def not_captured_problem(added: Sequence[TableName]) -> str:
    return (
        f"{', '.join(map(str, added))}: created on the source after the start, not captured: engine debezium does "
        "not add tables (its connector's table list is fixed at the start), so none of their rows reach the target; "
        "leave them out (tables.exclude in the migration file) or tear down and start again to include them"
    )


def _has_state(target: Connection) -> bool:
    return bool(fetch_value(target, "SELECT to_regclass(%s) IS NOT NULL", (f"{state.SCHEMA}.dbz_partitions",)))


def _table_progress(target: Connection) -> dict[str, tuple[int, bool]]:
    rows = fetch_all(target, _q("SELECT table_name, snapshot_rows, snapshot_done FROM {}.dbz_tables"))
    return {name: (int(n), bool(done)) for name, n, done in rows}


def _require_empty(target: Connection, tables: Sequence[TableName]) -> None:
    for table in tables:
        if fetch_value(target, "SELECT to_regclass(%s) IS NULL", (table.regclass,)):
            raise ValueError(f"target table {table} does not exist: create the schema on the target first")
        if fetch_value(target, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table.ident)):
            raise ValueError(
                f"target table {table} already holds rows this migration did not write: empty it or"
                " exclude the table (nothing was changed)"
            )
