"""Apply Debezium change events to the target: a batch per transaction, exactly once in effect.

Guarantees, whatever the transport redelivers:
- Offsets are stored on the target in the transaction that applies the rows
  (lambdas/core/changestream/state.py); records below a partition's stored offset are skipped.
- Debezium itself is at-least-once: after a connector restart it publishes a stretch of the stream
  again under new offsets. Each partition also keeps the stream position (`source.sequence`) of
  the last change applied; a change behind it is a republished one and is skipped, so a row never
  goes back to an older version. Changes at the same position (a key-changing UPDATE is a delete and
  a create at one LSN) are re-applied, which leaves the same state.
- Within a batch the changes of one row are folded into its final state and applied set-wise per
  table (deletes, then upserts); an unchanged TOASTed column (Debezium's placeholder) is never
  written: the target keeps its value, or an earlier change in the same batch supplies it. A row
  moved to a new key takes those values from its old row (copied aside before the deletes).
- A statement that fails is retried change by change, each under its own savepoint; a change that
  still fails is a dead letter (recorded with the batch, sent to the sink) and the rest flows on.
  Only errors about the change itself (bad data, constraint, schema mismatch) make dead letters; a
  transient or environmental error (deadlock, timeout, lost connection, disk full) fails the batch,
  which is rolled back and delivered again.
- Target sessions run as `session_replication_role = replica`, as native logical replication's
  apply does: foreign keys are not checked per change (the source already enforced them) and user
  triggers do not fire twice.

Here: reading, admitting and applying batches, dead letters and the stored state. The tables and
their routing are in target.py, a segment's folding into net changes in folding.py, and the SQL it
is applied with in statements.py.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import psycopg2
from psycopg2 import sql

from lambdas.core.changestream import state
from lambdas.core.changestream.convert import (
    ConversionError,
    is_unavailable,
)
from lambdas.core.changestream.deadletters import DeadLetter, DeadLetterSink
from lambdas.core.changestream.events import (
    SNAPSHOT_END,
    SNAPSHOT_POSITION,
    TABLE_SNAPSHOT_END,
    ChangeEvent,
    Op,
    StreamRecord,
    UnparseableEvent,
    parse_record,
)
from lambdas.core.changestream.folding import Change, change_units, fold_rows, row_of
from lambdas.core.changestream.statements import prepare_script, run_script, truncate_table
from lambdas.core.changestream.target import StreamRouting, TargetTable
from lambdas.core.db import Connection, Cursor

_NOT_ON_TARGET = (
    "an update with unchanged TOAST values for a row that is not on the target (for a key-changing update:"
    " whose old row is not)"
)
_MAX_LETTER_CHARS = 100_000  # an SQS message holds 256 KB; the reason and position matter most
_PARTITION_OFFSET = operator.itemgetter(0, 1, 2)  # a StreamRecord's (topic, partition, offset)


def _entry_partition(entry: tuple[StreamRecord, Any]) -> tuple[str, int]:
    return entry[0].topic, entry[0].partition


@dataclass
class TableProgress:
    snapshot_rows: int = 0
    snapshot_done: bool = False
    events: int = 0


@dataclass
class ApplyResult:
    records: int = 0
    applied: int = 0  # changes applied (after folding each row's changes, before it)
    replayed: int = 0  # below the stored offset: delivered again
    republished: int = 0  # behind the stored stream position: published again by the connector
    tombstones: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    last_source_lsn: int | None = None
    last_ts_ms: int | None = None
    tables: dict[str, TableProgress] = field(default_factory=dict)
    snapshot_completed: bool = False
    paused: bool = False  # the applier is paused on the target: nothing applied, no offset stored
    snapshot_lsn: int | None = None  # the newest snapshot whose reads this batch applies


Parsed = ChangeEvent | None | UnparseableEvent  # parse_record's result for a record, or why it failed


@dataclass(frozen=True)
class ReadBatch:
    """A batch's records in partition and offset order, each with what `parse_record` made of it.

    Reading needs no target: the consume loop reads the next batch on another thread while this one
    is applied (`ChangeApplier.read`)."""

    entries: list[tuple[StreamRecord, Parsed]]

    def __len__(self) -> int:
        return len(self.entries)


def _parsed(record: StreamRecord) -> Parsed:
    try:
        return parse_record(record)
    except UnparseableEvent as exc:
        return exc


class ChangeApplier:
    """Applies batches of records on one target connection (autocommit off; owned by the caller)."""

    def __init__(self, target: Connection, routing: StreamRouting, sink: DeadLetterSink) -> None:
        if target.autocommit:
            raise ValueError("the applier's target connection must not be in autocommit mode")
        self._conn = target
        self.target = target
        self._routing = routing
        self._sink = sink

    def read(self, records: Iterable[StreamRecord]) -> ReadBatch:
        """Sort and parse a batch (records of topics that feed no table are not parsed)."""
        tables = self._routing.tables
        return ReadBatch(
            [(r, _parsed(r) if r.topic in tables else None) for r in sorted(records, key=_PARTITION_OFFSET)]
        )

    def apply(self, records: Sequence[StreamRecord] | ReadBatch) -> ApplyResult:
        batch = records if isinstance(records, ReadBatch) else self.read(records)
        result = ApplyResult(records=len(batch))
        if not batch.entries:
            return result
        try:
            with self._conn.cursor() as cur:
                start = state.begin_batch(cur, ((r.topic, r.partition) for r, _ in batch.entries))
                if start.paused:
                    self._conn.rollback()
                    result.paused = True
                    return result
                partitions = start.partitions
                pending = self._admit(batch, partitions, result, start.snapshot_lsn)
                newest = result.snapshot_lsn
                if newest is not None and (start.snapshot_lsn is None or newest > start.snapshot_lsn):
                    self._empty_stale_tables(cur, newest, partitions, pending)
                for topic, changes in pending.items():
                    self._apply_table(cur, self._routing.tables[topic], changes, result)
                if result.dead_letters:
                    self._record_dead_letters(cur, result.dead_letters)
                    self._sink.send(result.dead_letters)  # durable before the offsets commit
                self._save_state(cur, partitions.values(), result)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            raise
        return result

    def _empty_stale_tables(
        self,
        cur: Cursor,
        snapshot_lsn: int,
        partitions: Mapping[tuple[str, int], state.PartitionState],
        pending: dict[str, list[Change]],
    ) -> None:
        """A newer snapshot than any applied so far: the connector took it again from the start. Every
        table still holding an older snapshot's rows (and changes streamed after it) is emptied before
        this one's reads are applied, whichever applier feeds it: one the source emptied meanwhile gets
        no read at all, so the check per partition in `_admit` never sees it. Its stream events older
        than the new snapshot, still to come, are skipped (`PartitionState.stream_floor`)."""
        for part in partitions.values():
            held = part.snapshot_lsn if part.snapshot_lsn is not None else part.last_source_lsn
            if held is None or held >= snapshot_lsn:
                continue
            table = self._routing.tables.get(part.topic)
            if table is None:
                continue
            truncate_table(cur, table.name)
            kept = [c for c in pending.get(part.topic, []) if c.event.lsn is None or c.event.lsn >= snapshot_lsn]
            pending[part.topic] = kept
            if part.streaming and not any(c.event.op is not Op.READ for c in kept):
                part.stream_floor = snapshot_lsn  # its older stream events still to come are in the snapshot
            part.position = SNAPSHOT_POSITION
            part.snapshot_lsn = snapshot_lsn
        for name in state.reset_stale_snapshots(cur, snapshot_lsn, partitions.keys()):
            truncate_table(cur, name)

    def _admit(
        self,
        batch: ReadBatch,
        partitions: Mapping[tuple[str, int], state.PartitionState],
        result: ApplyResult,
        applied_snapshot_lsn: int | None = None,
    ) -> dict[str, list[Change]]:
        """Decide what each record is: a replay, a tombstone, a dead letter, or a change to apply (the
        changes per topic, in offset order). One partition's records at a time: the hot loop.

        `applied_snapshot_lsn` is the newest snapshot applied before: reads of an older one are stale."""
        pending: dict[str, list[Change]] = {}
        for (topic, partition), group in groupby(batch.entries, key=_entry_partition):
            part = partitions[(topic, partition)]
            table = self._routing.tables.get(topic)
            if table is None:
                self._admit_other(topic, (rec for rec, _ in group), part, result)
                continue
            changes = pending.setdefault(topic, [])
            snapshot_rows = events = 0
            table_done = False
            last_lsn = last_ts = None
            for rec, event in group:
                if rec.offset < part.next_offset:
                    result.replayed += 1
                    continue
                if rec.offset > part.next_offset:
                    # records never delivered (a batch the event source mapping gave up on, or removed by
                    # retention): the topics are neither compacted nor transactional, so changes are missing
                    result.dead_letters.append(
                        _letter(
                            rec,
                            None,
                            f"offsets {part.next_offset}..{rec.offset - 1} of {topic}[{partition}] were never"
                            " delivered to the applier: their changes are missing on the target",
                        )
                    )
                part.next_offset = rec.offset + 1
                if isinstance(event, UnparseableEvent):
                    result.dead_letters.append(_letter(rec, None, f"unparseable event: {event}"))
                    continue
                if event is None:
                    result.tombstones += 1
                    continue
                op = event.op
                if op is Op.MESSAGE:
                    continue
                position = event.position
                if part.stream_floor is not None and op is not Op.READ:
                    if event.lsn is not None and event.lsn < part.stream_floor:
                        result.republished += 1  # older than the snapshot that emptied the table: in it
                        continue
                    part.stream_floor = None
                if op is Op.READ and event.lsn is not None:
                    # Each read carries its snapshot's LSN, and snapshots only move forward: a read older
                    # than the newest snapshot applied (to any table, or to this one: another applier may
                    # have moved it on) is stale.
                    if (applied_snapshot_lsn is not None and event.lsn < applied_snapshot_lsn) or (
                        part.snapshot_lsn is not None and event.lsn < part.snapshot_lsn
                    ):
                        result.republished += 1
                        continue
                    newer = part.snapshot_lsn is None or event.lsn > part.snapshot_lsn
                    if newer and part.streaming and part.last_source_lsn is not None:
                        # taken after everything streamed so far (a state an earlier version wrote has no
                        # snapshot LSN for a streaming partition: its reads again are replays, not newer)
                        newer = event.lsn > part.last_source_lsn
                    if newer:
                        if part.snapshot_lsn is not None or part.streaming:
                            # Reads of a newer snapshot: the connector stopped before its offsets said the
                            # snapshot was done (or, on Kafka Connect, before it flushed its first offset
                            # after it) and took it again, and streams from after *that* one: a change made
                            # meanwhile is in no event. The table starts over in this batch's transaction,
                            # and so does its stream position.
                            changes.append(Change(rec, dataclasses.replace(event, op=Op.TRUNCATE)))
                            part.position = SNAPSHOT_POSITION
                        part.snapshot_lsn = event.lsn
                    if not part.streaming:
                        part.stream_floor = None  # the snapshot's own reads: what follows them is newer
                        if result.snapshot_lsn is None or event.lsn > result.snapshot_lsn:
                            result.snapshot_lsn = event.lsn
                if position == SNAPSHOT_POSITION:
                    if part.position != SNAPSHOT_POSITION:  # streaming had begun: a snapshot read again
                        result.republished += 1
                        continue
                    if op is Op.READ:
                        snapshot_rows += 1
                    if event.snapshot_marker == SNAPSHOT_END:
                        result.snapshot_completed = True
                elif position < part.position:
                    result.republished += 1
                    continue
                else:
                    part.position = position
                    result.snapshot_completed = True
                if event.snapshot_marker in TABLE_SNAPSHOT_END:
                    table_done = True
                events += 1
                if event.lsn is not None:
                    last_lsn = event.lsn
                    if result.last_source_lsn is None or last_lsn > result.last_source_lsn:
                        result.last_source_lsn = last_lsn
                if event.ts_ms is not None:
                    last_ts = event.ts_ms
                    if result.last_ts_ms is None or last_ts > result.last_ts_ms:
                        result.last_ts_ms = last_ts
                changes.append(Change(rec, event))
            if events:
                part.events += events
                if last_lsn is not None:
                    part.last_source_lsn = last_lsn
                if last_ts is not None:
                    part.last_ts_ms = last_ts
                progress = result.tables.get(table.label)
                if progress is None:
                    progress = result.tables[table.label] = TableProgress()
                progress.events += events
                progress.snapshot_rows += snapshot_rows
                progress.snapshot_done = progress.snapshot_done or table_done
        return pending

    def _admit_other(
        self, topic: str, records: Iterable[StreamRecord], part: state.PartitionState, result: ApplyResult
    ) -> None:
        """Records of a topic that feeds no table: heartbeats (the connector streams), or dead letters."""
        for rec in records:
            if rec.offset < part.next_offset:
                result.replayed += 1
                continue
            part.next_offset = rec.offset + 1
            if topic == self._routing.heartbeat_topic:
                result.snapshot_completed = True  # the connector emits heartbeats once it streams
            else:
                result.dead_letters.append(_letter(rec, None, f"no target table is mapped to topic {topic!r}"))

    def _apply_table(self, cur: Cursor, table: TargetTable, changes: list[Change], result: ApplyResult) -> None:
        segment: list[Change] = []
        for change in changes:
            if change.event.op is Op.TRUNCATE:
                self._apply_segment(cur, table, segment, result, last=False)
                segment = []
                self._guarded(cur, lambda: truncate_table(cur, table.name), [change], table, result)
            else:
                segment.append(change)
        if len(segment) > 1 and segment[-1].event.op is Op.DELETE:
            # A last delete of a row changed before in the batch: that state is written first, so the row the
            # delete removes (kept for a key move whose create starts the next batch) is the one it deleted.
            deleted = row_of(table, segment[-1].event)
            if deleted is not None and any(row_of(table, c.event) == deleted for c in segment[:-1]):
                self._apply_segment(cur, table, segment[:-1], result, last=False)
                segment = segment[-1:]
        self._apply_segment(cur, table, segment, result, last=True)

    def _apply_segment(
        self, cur: Cursor, table: TargetTable, changes: list[Change], result: ApplyResult, *, last: bool
    ) -> None:
        """Fold, then apply set-wise; on failure, change by change so that only bad ones become dead letters.
        `last`: the batch's last segment of the table, whose trailing delete may be half of a key move."""
        if not changes:
            return
        plan = table.plan
        valid: list[Change] = []
        reloaded = False
        for change in changes:
            if change.event.op is not Op.DELETE:
                change.marked = plan.may_hold_placeholder(change.record.value)
            problem = _schema_problem(table, change.event, change.marked)
            if problem is not None and problem.startswith(_UNKNOWN_COLUMNS) and not reloaded:
                # Columns are added on the target before the source (as a schema change must be): read the
                # table again, in this batch's transaction, before calling the change a mismatch.
                table, reloaded = self._routing.reload(self._conn, table), True
                plan = table.plan
                problem = _schema_problem(table, change.event, change.marked)
            if problem:
                result.dead_letters.append(_letter(change.record, change.event, problem))
            else:
                valid.append(change)
        if not valid:
            return
        rows = fold_rows(table, valid)
        try:
            script = prepare_script(cur, table, rows, python=False, last=last)
            missing = run_script(cur, script, "zdm_batch")
        except (psycopg2.Error, ConversionError) as exc:
            if isinstance(exc, psycopg2.Error):
                if not _refused_change(exc):
                    raise  # not about a change: the whole batch rolls back and is delivered again
                cur.execute("ROLLBACK TO SAVEPOINT zdm_batch")  # (a ConversionError comes before any statement)
            units = change_units(valid)
            for n, unit in enumerate(units, 1):
                self._apply_one(cur, table, unit, result, last=last and n == len(units))
            return
        result.applied += len(valid)
        if missing:
            by_key = {row_of(table, c.event): c for c in valid}
            for key in missing:
                change = by_key[key]
                result.dead_letters.append(
                    _letter(
                        change.record,
                        change.event,
                        _NOT_ON_TARGET + ": its full value cannot be rebuilt (re-run validation and fix the row)",
                    )
                )
                result.applied -= 1

    def _apply_one(
        self, cur: Cursor, table: TargetTable, unit: list[Change], result: ApplyResult, *, last: bool
    ) -> None:
        """One change (or a key move's delete and create) under its own savepoint, converted in SQL;
        refused, converted by Python instead (whose error names the column's type, and which takes what
        SQL does not); refused again, a dead letter."""
        rows = fold_rows(table, unit)
        reason = ""
        for python in (False, True):
            try:
                script = prepare_script(cur, table, rows, python=python, last=last)
            except ConversionError as exc:
                reason = f"a value cannot be converted to its column's type: {exc}"
                continue
            try:
                missing = set(run_script(cur, script, "zdm_change"))
            except psycopg2.Error as exc:
                if not _refused_change(exc):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT zdm_change")
                reason = _pg_reason(exc)
                continue
            unwritten = [c for c in unit if c.event.op is not Op.DELETE and row_of(table, c.event) in missing]
            for change in unwritten:
                result.dead_letters.append(_letter(change.record, change.event, _NOT_ON_TARGET))
            result.applied += len(unit) - len(unwritten)
            return
        for change in unit:
            result.dead_letters.append(_letter(change.record, change.event, reason))

    def _guarded(self, cur: Cursor, write: Any, changes: list[Change], table: TargetTable, result: ApplyResult) -> None:
        cur.execute("SAVEPOINT zdm_change")
        try:
            missing = write()
        except psycopg2.Error as exc:
            if not _refused_change(exc):
                raise
            cur.execute("ROLLBACK TO SAVEPOINT zdm_change")
            reason = _pg_reason(exc)
            for change in changes:
                result.dead_letters.append(_letter(change.record, change.event, reason))
            return
        cur.execute("RELEASE SAVEPOINT zdm_change")
        if missing:
            for change in changes:
                result.dead_letters.append(
                    _letter(
                        change.record,
                        change.event,
                        _NOT_ON_TARGET,
                    )
                )
            return
        result.applied += len(changes)

    def _record_dead_letters(self, cur: Cursor, letters: list[DeadLetter]) -> None:
        for letter in letters:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {}.dbz_dead_letters (topic, kafka_partition, kafka_offset, source_lsn, reason,"
                    " record_key, record_value) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(sql.Identifier(state.SCHEMA)),
                (
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    letter.source_lsn,
                    letter.reason,
                    letter.key,
                    letter.value,
                ),
            )

    def _save_state(self, cur: Cursor, partitions: Iterable[state.PartitionState], result: ApplyResult) -> None:
        """Each partition's offset and position, each table's progress: one round trip (rows locked in
        key order: the partitions' already are, the tables' by name)."""
        parts = sorted(partitions, key=lambda p: (p.topic, p.partition))
        statements: list[sql.Composable] = [
            sql.SQL(
                "UPDATE {}.dbz_partitions AS p SET next_offset = v.next_offset, commit_lsn = v.commit_lsn,"
                " lsn = v.lsn, events = v.events, last_source_lsn = v.last_source_lsn, last_ts_ms = v.last_ts_ms,"
                " snapshot_lsn = v.snapshot_lsn, stream_floor = v.stream_floor,"
                " table_schema = coalesce(v.table_schema, p.table_schema),"
                " table_name = coalesce(v.table_name, p.table_name), updated_at = now()"
                " FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],"
                " %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[])"
                " AS v(topic, kafka_partition, next_offset, commit_lsn, lsn, events, last_source_lsn, last_ts_ms,"
                " snapshot_lsn, stream_floor, table_schema, table_name)"
                " WHERE p.topic = v.topic AND p.kafka_partition = v.kafka_partition"
            ).format(sql.Identifier(state.SCHEMA))
        ]
        params: list[Any] = [
            [p.topic for p in parts],
            [p.partition for p in parts],
            [p.next_offset for p in parts],
            [p.position.commit_lsn for p in parts],
            [p.position.lsn for p in parts],
            [p.events for p in parts],
            [p.last_source_lsn for p in parts],
            [p.last_ts_ms for p in parts],
            [p.snapshot_lsn for p in parts],
            [p.stream_floor for p in parts],
        ]
        fed = [self._routing.tables.get(p.topic) for p in parts]
        params += [[t.name.schema if t else None for t in fed], [t.name.name if t else None for t in fed]]
        if result.tables:
            tables = sorted(result.tables.items())
            statements.append(
                sql.SQL(
                    "INSERT INTO {}.dbz_tables AS t (table_name, snapshot_rows, snapshot_done, events)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::boolean[], %s::bigint[])"
                    " ON CONFLICT (table_name) DO UPDATE SET"
                    " snapshot_rows = t.snapshot_rows + EXCLUDED.snapshot_rows,"
                    " snapshot_done = t.snapshot_done OR EXCLUDED.snapshot_done,"
                    " events = t.events + EXCLUDED.events"
                ).format(sql.Identifier(state.SCHEMA))
            )
            params += [
                [name for name, _ in tables],
                [p.snapshot_rows for _, p in tables],
                [p.snapshot_done for _, p in tables],
                [p.events for _, p in tables],
            ]
        if result.snapshot_completed:
            statements.append(
                sql.SQL(
                    # only the first batch to see it writes (and locks) the row
                    "UPDATE {}.dbz_stream SET snapshot_completed = true WHERE id = 1 AND NOT snapshot_completed"
                ).format(sql.Identifier(state.SCHEMA))
            )
        cur.execute(sql.SQL("; ").join(statements), params)


def _letter(rec: StreamRecord, event: ChangeEvent | None, reason: str) -> DeadLetter:
    def text(raw: bytes | None) -> str | None:
        # PostgreSQL text cannot hold NUL: a record carrying one must still become a dead letter, not
        # stop the applier on every restart
        return None if raw is None else _printable(raw.decode("utf-8", "replace"))[:_MAX_LETTER_CHARS]

    return DeadLetter(
        topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        source_lsn=event.lsn if event else None,
        reason=_printable(reason),
        key=text(rec.key),
        value=text(rec.value),
    )


# SQLSTATE classes that say the change itself cannot be applied: data exceptions (22), integrity
# constraint violations (23), triggered data change violations (27), schema mismatches (42) and errors
# raised by a target trigger (P0). Anything else (deadlock, serialization failure, lock or statement
# timeout, cancel, lost connection, out of disk or memory, missing privilege) says nothing about the
# change: turning it into a dead letter would drop a good change for good.
_CHANGE_ERROR_CLASSES = frozenset({"22", "23", "27", "42", "P0"})
_NOT_A_CHANGE_ERROR = frozenset({"42501"})  # insufficient_privilege: the applier's role, not the change


def _refused_change(exc: psycopg2.Error) -> bool:
    code = exc.pgcode or ""
    return code[:2] in _CHANGE_ERROR_CLASSES and code not in _NOT_A_CHANGE_ERROR


def _printable(text: str) -> str:
    return text.replace("\x00", "\\u0000")


def _pg_reason(exc: psycopg2.Error) -> str:
    first = (exc.pgerror or str(exc)).strip().splitlines()
    return f"the target refused the change: {first[0] if first else type(exc).__name__}"


_UNKNOWN_COLUMNS = "schema mismatch: column(s)"


def _schema_problem(table: TargetTable, event: ChangeEvent, marked: bool) -> str | None:
    plan = table.plan
    if event.op is Op.DELETE:
        key = event.key or {}
        absent = [k for k in table.key if k not in key]
        return f"the delete's key lacks {', '.join(absent)} of {table.name}'s primary key" if absent else None
    after = event.after or {}
    names = after.keys()
    if not (names == plan.full or names == plan.full_generated):  # else: every column, nothing unknown
        unknown = sorted(names - plan.full_generated)
        if unknown:
            return (
                f"{_UNKNOWN_COLUMNS} {', '.join(unknown)} of the event are not on target table {table.name};"
                " add them to the target (schema changes are not replicated)"
            )
        left_out = sorted(table.expected - names)
        if left_out:
            return (
                f"the event has no value for column(s) {', '.join(left_out)} of {table.name}, which the source has:"
                " Debezium leaves out columns of types it does not know; use engine 'logical' for this table"
            )
    elif not marked:
        return None
    absent = [k for k in table.key if k not in after or (marked and is_unavailable(after[k]))]
    if absent:
        return f"the event lacks primary key column(s) {', '.join(absent)} of {table.name}"
    return None
