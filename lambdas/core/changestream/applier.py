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
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import groupby
from typing import Any, NamedTuple

import msgspec
import psycopg2
from psycopg2 import sql

from lambdas.core.catalog import describe_tables
from lambdas.core.changestream import state
from lambdas.core.changestream.connector import heartbeat_topic, table_topic
from lambdas.core.changestream.convert import (
    ColumnType,
    ConversionError,
    SqlConversion,
    is_unavailable,
    placeholder_markers,
    sql_conversion,
    to_text,
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
from lambdas.core.db import Connection, Cursor
from lambdas.core.tables import TableName

_NOT_ON_TARGET = (
    "an update with unchanged TOAST values for a row that is not on the target (for a key-changing update:"
    " whose old row is not)"
)
_MAX_LETTER_CHARS = 100_000  # an SQS message holds 256 KB; the reason and position matter most
_PARTITION_OFFSET = operator.itemgetter(0, 1, 2)  # a StreamRecord's (topic, partition, offset)


def _entry_partition(entry: tuple[StreamRecord, Any]) -> tuple[str, int]:
    return entry[0].topic, entry[0].partition


@dataclass(frozen=True)
class TargetTable:
    name: TableName
    key: tuple[str, ...]
    columns: Mapping[str, ColumnType]  # the columns a change may write (generated ones excluded)
    generated: frozenset[str] = frozenset()
    # The source's columns among those: an insert or update must carry each (Debezium leaves out a column
    # of a type it does not know, which would be written as NULL); empty when not recorded.
    expected: frozenset[str] = frozenset()

    @cached_property
    def label(self) -> str:
        return str(self.name)

    @cached_property
    def plan(self) -> _TablePlan:
        return _TablePlan(self)


class _TablePlan:
    """What applying a table's batches needs, worked out once per table: each column's conversion (in
    SQL, or in Python first), the forms of the placeholder to look for, the key, the statements."""

    def __init__(self, table: TargetTable) -> None:
        self.order = tuple(table.columns)
        self.full = frozenset(self.order)  # an event's columns, usually: every column is written
        self.full_generated = self.full | table.generated
        self.key_set = frozenset(table.key)
        self._key_values = operator.itemgetter(*table.key)  # one column: its value, else a tuple
        self.conversions: dict[bool, dict[str, SqlConversion]] = {
            python: {n: sql_conversion(c, python=python) for n, c in table.columns.items()} for python in (False, True)
        }
        self.markers = placeholder_markers(table.columns.values())
        self.statements: dict[tuple[Any, ...], str] = {}

    def row_key(self, values: Mapping[str, Any]) -> Hashable:
        """The key columns' JSON values, to fold a row's changes by (a delete's and an upsert's alike)."""
        key: Hashable = self._key_values(values)
        try:
            hash(key)
        except TypeError:  # an array (a JSON list) in the key
            key = json.dumps(key, sort_keys=True)
        return key

    def may_hold_placeholder(self, raw: bytes | None) -> bool:
        """Whether the record may carry the unchanged-TOAST placeholder: only then are its values checked."""
        if raw is None:
            return False
        return any(marker in raw for marker in self.markers)


@dataclass(frozen=True)
class StreamRouting:
    """Which target table each topic feeds, with the column types the conversion needs."""

    tables: Mapping[str, TargetTable]
    heartbeat_topic: str | None = None

    @property
    def topics(self) -> list[str]:
        return sorted(self.tables) + ([self.heartbeat_topic] if self.heartbeat_topic else [])

    @classmethod
    def for_topics(cls, target: Connection, prefix: str, topics: Iterable[str]) -> StreamRouting:
        """Routing for the table topics an event source delivers (<prefix>.<schema>.<table>)."""
        tables = []
        for topic in topics:
            schema, _, name = topic.removeprefix(prefix + ".").partition(".")
            if not topic.startswith(prefix + ".") or not name:
                raise ValueError(
                    f"topic {topic!r} is not a table topic of prefix {prefix!r} (<prefix>.<schema>.<table>)"
                )
            tables.append(TableName(schema, name))
        return cls.load(target, prefix, tables)

    @classmethod
    def load(cls, target: Connection, prefix: str, tables: Iterable[TableName]) -> StreamRouting:
        wanted = list(tables)
        infos = describe_tables(target, wanted)
        missing = [str(t) for t in wanted if t not in infos]
        if missing:
            raise ValueError(f"target tables missing: {', '.join(missing)}; create the schema on the target first")
        routed: dict[str, TargetTable] = {}
        on_source = state.source_columns(target)
        for name in wanted:
            info = infos[name]
            if not info.primary_key:
                raise ValueError(
                    f"table {name} has no primary key: the debezium engine upserts and deletes by key;"
                    " add one or use engine 'logical'"
                )
            routed[table_topic(prefix, name)] = TargetTable(
                name=name,
                key=info.primary_key,
                columns={c.name: ColumnType.of(c.type) for c in info.columns if not c.generated},
                generated=frozenset(c.name for c in info.columns if c.generated),
                expected=on_source.get(str(name), frozenset()) & {c.name for c in info.columns if not c.generated},
            )
        if not target.autocommit:
            target.rollback()
        return cls(routed, heartbeat_topic(prefix))


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


@dataclass(slots=True)
class _Change:
    record: StreamRecord
    event: ChangeEvent
    marked: bool = False  # the record may carry the unchanged-TOAST placeholder: its values are checked


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
                paused, partitions = state.begin_batch(cur, ((r.topic, r.partition) for r, _ in batch.entries))
                if paused:
                    self._conn.rollback()
                    result.paused = True
                    return result
                pending = self._admit(batch, partitions, result)
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

    def _admit(
        self,
        batch: ReadBatch,
        partitions: Mapping[tuple[str, int], state.PartitionState],
        result: ApplyResult,
    ) -> dict[str, list[_Change]]:
        """Decide what each record is: a replay, a tombstone, a dead letter, or a change to apply (the
        changes per topic, in offset order). One partition's records at a time: the hot loop."""
        pending: dict[str, list[_Change]] = {}
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
                changes.append(_Change(rec, event))
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

    def _apply_table(self, cur: Cursor, table: TargetTable, changes: list[_Change], result: ApplyResult) -> None:
        segment: list[_Change] = []
        for change in changes:
            if change.event.op is Op.TRUNCATE:
                self._apply_segment(cur, table, segment, result, last=False)
                segment = []
                self._guarded(cur, lambda: _truncate(cur, table), [change], table, result)
            else:
                segment.append(change)
        if len(segment) > 1 and segment[-1].event.op is Op.DELETE:
            # A last delete of a row changed before in the batch: that state is written first, so the row the
            # delete removes (kept for a key move whose create starts the next batch) is the one it deleted.
            deleted = _row_of(table, segment[-1].event)
            if deleted is not None and any(_row_of(table, c.event) == deleted for c in segment[:-1]):
                self._apply_segment(cur, table, segment[:-1], result, last=False)
                segment = segment[-1:]
        self._apply_segment(cur, table, segment, result, last=True)

    def _apply_segment(
        self, cur: Cursor, table: TargetTable, changes: list[_Change], result: ApplyResult, *, last: bool
    ) -> None:
        """Fold, then apply set-wise; on failure, change by change so that only bad ones become dead letters.
        `last`: the batch's last segment of the table, whose trailing delete may be half of a key move."""
        if not changes:
            return
        plan = table.plan
        valid: list[_Change] = []
        for change in changes:
            if change.event.op is not Op.DELETE:
                change.marked = plan.may_hold_placeholder(change.record.value)
            problem = _schema_problem(table, change.event, change.marked)
            if problem:
                result.dead_letters.append(_letter(change.record, change.event, problem))
            else:
                valid.append(change)
        if not valid:
            return
        rows = _fold(table, valid)
        try:
            script = _prepare(cur, table, rows, python=False, last=last)
            missing = _run(cur, script, "zdm_batch")
        except (psycopg2.Error, ConversionError) as exc:
            if isinstance(exc, psycopg2.Error):
                if not _refused_change(exc):
                    raise  # not about a change: the whole batch rolls back and is delivered again
                cur.execute("ROLLBACK TO SAVEPOINT zdm_batch")  # (a ConversionError comes before any statement)
            units = _units(valid)
            for n, unit in enumerate(units, 1):
                self._apply_one(cur, table, unit, result, last=last and n == len(units))
            return
        result.applied += len(valid)
        if missing:
            by_key = {_row_of(table, c.event): c for c in valid}
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
        self, cur: Cursor, table: TargetTable, unit: list[_Change], result: ApplyResult, *, last: bool
    ) -> None:
        """One change (or a key move's delete and create) under its own savepoint, converted in SQL;
        refused, converted by Python instead (whose error names the column's type, and which takes what
        SQL does not); refused again, a dead letter."""
        rows = _fold(table, unit)
        reason = ""
        for python in (False, True):
            try:
                script = _prepare(cur, table, rows, python=python, last=last)
            except ConversionError as exc:
                reason = f"a value cannot be converted to its column's type: {exc}"
                continue
            try:
                missing = set(_run(cur, script, "zdm_change"))
            except psycopg2.Error as exc:
                if not _refused_change(exc):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT zdm_change")
                reason = _pg_reason(exc)
                continue
            unwritten = [c for c in unit if c.event.op is not Op.DELETE and _row_of(table, c.event) in missing]
            for change in unwritten:
                result.dead_letters.append(_letter(change.record, change.event, _NOT_ON_TARGET))
            result.applied += len(unit) - len(unwritten)
            return
        for change in unit:
            result.dead_letters.append(_letter(change.record, change.event, reason))

    def _guarded(
        self, cur: Cursor, write: Any, changes: list[_Change], table: TargetTable, result: ApplyResult
    ) -> None:
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
                " updated_at = now()"
                " FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[],"
                " %s::bigint[], %s::bigint[])"
                " AS v(topic, kafka_partition, next_offset, commit_lsn, lsn, events, last_source_lsn, last_ts_ms)"
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
        ]
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
                f"schema mismatch: column(s) {', '.join(unknown)} of the event are not on target table {table.name};"
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


def _units(changes: Sequence[_Change]) -> list[list[_Change]]:
    """Changes one by one, but a key move (a delete and a create at the same position) kept together:
    the create may need the old row's unchanged TOAST values."""
    units: list[list[_Change]] = []
    for change in changes:
        event = change.event
        if units and len(units[-1]) == 1 and _move_pair(units[-1][0].event, event):
            units[-1].append(change)
            continue
        units.append([change])
    return units


def _move_pair(previous: ChangeEvent, event: ChangeEvent) -> bool:
    """Whether `event` is the create that goes with the delete `previous`: a key-changing UPDATE (both at
    one LSN, the create right after the delete in the partition)."""
    return previous.op is Op.DELETE and event.op is Op.CREATE and event.lsn is not None and previous.lsn == event.lsn


def _row_of(table: TargetTable, event: ChangeEvent) -> Hashable | None:
    """The fold key of the row a change touches; None when it does not say (a change with a schema problem)."""
    values = event.key if event.op is Op.DELETE else event.after
    if not values or any(k not in values for k in table.key):
        return None
    return table.plan.row_key(values)


_NOTHING_KEPT: frozenset[str] = frozenset()
_Shape = tuple[tuple[str, ...], tuple[str, ...]]  # (columns written, columns kept as they are on the target)
# A row's net change while folding: its values as Debezium sent them, the columns to keep as a target row
# has them (None: the row is deleted), and which row that is when not the row itself (a key move's old row).
_FoldState = tuple[Mapping[str, Any], frozenset[str] | None, "_Origin | None"]
_NO_ROW: _FoldState = ({}, None, None)


class _Origin(NamedTuple):
    """Where a moved row's unchanged TOAST values are: the old row, by its key (in this batch, or on the
    target), or the old row the previous batch ended by deleting, by that delete's LSN."""

    key: Mapping[str, Any] | None
    lsn: int | None = None


@dataclass
class _Rows:
    """A segment's net changes, each row with its fold key and its values as Debezium sent them."""

    deletes: list[tuple[Hashable, Mapping[str, Any]]] = field(default_factory=list)  # the key columns' values
    upserts: dict[_Shape, list[tuple[Hashable, Mapping[str, Any]]]] = field(default_factory=dict)
    # rows that moved to a new key with unchanged TOAST values: (fold key, values, where the old row is)
    moves: dict[_Shape, list[tuple[Hashable, Mapping[str, Any], _Origin]]] = field(default_factory=dict)
    # the segment ends with a delete of a row unchanged before it in the batch: (its key values, its LSN)
    trailing_delete: tuple[Mapping[str, Any], int] | None = None


def _available(table: TargetTable, after: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """The row's values but the placeholders, and the columns Debezium did not send (unchanged TOAST)."""
    values: dict[str, Any] = {}
    unavailable: set[str] = set()
    for name, value in after.items():
        if isinstance(value, (str, list, dict)) and is_unavailable(value):
            if name in table.columns:  # (a generated column is not written anyway)
                unavailable.add(name)
        else:
            values[name] = value
    return values, frozenset(unavailable)


def _moved(
    values: dict[str, Any], unavailable: frozenset[str], old_key: Mapping[str, Any], old: _FoldState | None
) -> _FoldState:
    """The new row of a key-changing UPDATE whose unchanged TOAST values Debezium did not send: they are
    the old row's, from its state earlier in the batch, else from the target's row (or its own origin)."""
    if old is None or old[1] is None:
        return values, unavailable, _Origin(old_key)
    old_values, _, old_origin = old
    filled = {c: old_values[c] for c in unavailable if c in old_values}
    kept = frozenset(c for c in unavailable if c not in old_values)
    return {**filled, **values}, kept, (old_origin or _Origin(old_key)) if kept else None


def _fold(table: TargetTable, changes: Sequence[_Change]) -> _Rows:
    """Each row's net change: the last one wins; an unchanged TOASTed column takes an earlier change's
    value, or is kept as it is on the target. Values stay as Debezium sent them (the hot loop).

    A key-changing UPDATE arrives as a delete of the old key and a create of the new one at the same
    position; when the create lacks unchanged TOAST values, they are the old row's (`_moved`). A
    segment starting with such a create may be the second half of a move whose delete ended the
    previous batch: its old row is looked up by that delete's LSN.
    """
    plan = table.plan
    rows: dict[Hashable, _FoldState] = {}
    # the change just before, if a delete: its event, key values and the row's state before it
    deleted: tuple[ChangeEvent, Mapping[str, Any], _FoldState | None] | None = None
    for position, change in enumerate(changes):
        event = change.event
        if event.op is Op.DELETE:
            key_values = event.key or {}
            fold_key = plan.row_key(key_values)
            deleted = (event, key_values, rows.get(fold_key))
            rows[fold_key] = (key_values, None, None)
            continue
        moved_from, deleted = deleted, None
        values: Mapping[str, Any] = event.after or {}
        unavailable = _NOTHING_KEPT
        if change.marked:
            values, unavailable = _available(table, values)
        key = plan.row_key(values)  # _schema_problem made sure the key is there
        if unavailable and moved_from and _move_pair(moved_from[0], event):
            rows[key] = _moved(dict(values), unavailable, moved_from[1], moved_from[2])
            continue
        if unavailable and event.op is Op.CREATE and position == 0 and event.lsn is not None:
            rows[key] = (values, unavailable, _Origin(None, event.lsn))
            continue
        prev_values, prev_kept, prev_origin = rows.get(key, _NO_ROW)
        origin = None
        # after an earlier upsert of this row in the batch: merged, unless this change has every column
        if prev_kept is not None and (unavailable or prev_kept or not values.keys() >= prev_values.keys()):
            keep = (prev_kept - values.keys()) | (unavailable - prev_values.keys())
            values, unavailable, origin = {**prev_values, **values}, frozenset(keep), prev_origin if keep else None
        rows[key] = (values, unavailable, origin)
    out = _Rows()
    if deleted is not None and deleted[0].lsn is not None and deleted[2] is None:
        out.trailing_delete = (deleted[1], deleted[0].lsn)
    for key, (row, kept, origin) in rows.items():
        if kept is None:
            out.deletes.append((key, row))
            continue
        names = row.keys()
        if names == plan.full or names == plan.full_generated:
            columns = plan.order
        else:
            columns = tuple(c for c in plan.order if c in names)
        if origin is not None:
            out.moves.setdefault((columns, tuple(sorted(kept))), []).append((key, row, origin))
        else:
            out.upserts.setdefault((columns, tuple(sorted(kept))), []).append((key, row))
    return out


_ORDINAL = "zdm ordinal"  # the recordset's row number, for the rows a partial update did not find


@dataclass
class _Script:
    """A segment's statements: those run in one round trip, then partial updates (which return rows)."""

    statements: list[tuple[str, str]] = field(default_factory=list)  # (SQL, JSON payload)
    partial: list[tuple[str, str, list[Hashable]]] = field(default_factory=list)  # (SQL, payload, fold keys)
    # key moves: the old rows are copied aside before any statement, the new ones written after the others;
    # then the row of a trailing delete is kept for the next batch
    stash: list[tuple[str, str]] = field(default_factory=list)  # (SQL, payload)
    moves: list[tuple[str, str, list[Hashable]]] = field(default_factory=list)  # (SQL, payload, fold keys)
    after: list[tuple[str, str]] = field(default_factory=list)  # (SQL, payload)


def _prepare(cur: Cursor, table: TargetTable, rows: _Rows, *, python: bool, last: bool = False) -> _Script:
    """The statements and their JSON payloads: values as Debezium sent them, converted by PostgreSQL
    (`python`: every value converted by `to_text` first). Raises ConversionError before any statement runs."""
    conversions = table.plan.conversions[python]
    script = _Script()
    if rows.deletes:
        statement = _statement(cur, table, "delete", table.key, python)
        script.statements.append((statement, _payload(table, [v for _, v in rows.deletes], table.key, conversions)))
    for (columns, kept), entries in rows.upserts.items():
        payload = _payload(table, [v for _, v in entries], columns, conversions)
        if not kept:
            script.statements.append((_statement(cur, table, "upsert", columns, python), payload))
        else:
            script.partial.append((_statement(cur, table, "update", columns, python), payload, [k for k, _ in entries]))
    trailing = rows.trailing_delete if last else None
    if rows.moves:
        # the old rows of this segment's moves, and the row its last delete removes, copied aside first
        aside = [o.key for entries in rows.moves.values() for _, _, o in entries if o.key is not None]
        aside += [trailing[0]] if trailing else []
        script.stash.append((_stash_statement(cur, table, python), _payload(table, aside, table.key, conversions)))
    for (columns, kept), moved in rows.moves.items():
        fields = [*columns, *(_origin(k) for k in table.key), _ORIGIN_LSN]
        payload = _payload(
            table, [{**values, **_origin_values(table, origin)} for _, values, origin in moved], fields, conversions
        )
        script.moves.append((_move_statement(cur, table, columns, kept, python), payload, [k for k, _, _ in moved]))
    if trailing:
        payload = _payload(table, [{**trailing[0], _ORIGIN_LSN: trailing[1]}], [*table.key, _ORIGIN_LSN], conversions)
        if rows.moves:  # after the moves have read the row the previous batch kept; from the copy aside
            script.after.append((_keep_statement(cur, table, python, aside=True), payload))
        else:  # no moves (the usual case): straight from the table, before the deletes, in the first round trip
            script.stash.append((_keep_statement(cur, table, python, aside=False), payload))
    return script


def _run(cur: Cursor, script: _Script, savepoint: str) -> list[Hashable]:
    """Runs the script under `savepoint` (its first statement); returns the fold keys of partial updates
    whose row was not on the target. On an error the savepoint exists: roll back to it."""
    first = [*script.stash, *script.statements]
    statements = [f"SAVEPOINT {savepoint}", *(s for s, _ in first)]
    returning = [*script.partial, *script.moves]
    if not returning and not script.after:
        statements.append(f"RELEASE SAVEPOINT {savepoint}")
    cur.execute("; ".join(statements), [p for _, p in first] or None)
    missing: list[Hashable] = []
    for statement, payload, keys in returning:
        cur.execute(statement, (payload,))
        found = {n for (n,) in cur.fetchall()}
        missing += [k for n, k in enumerate(keys, 1) if n not in found]
    for statement, payload in script.after:
        cur.execute(statement, (payload,))
    if returning or script.after:
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
    return missing


def _payload(
    table: TargetTable, rows: list[Mapping[str, Any]], columns: Sequence[str], conversions: Mapping[str, SqlConversion]
) -> str:
    converted = [
        (c, table.columns[_column_of(c)]) for c in columns if c != _ORIGIN_LSN and conversions[_column_of(c)].python
    ]  # (a key column named "lsn" is "zdm old lsn": the two never meet)
    if converted:
        rows = [_converted(values, converted) for values in rows]
    try:
        return _encode(rows).decode()
    except (UnicodeEncodeError, TypeError):  # a lone surrogate from the lenient reader: JSON escapes it
        return json.dumps(rows)


_encode = msgspec.json.Encoder().encode


def _converted(values: Mapping[str, Any], columns: list[tuple[str, ColumnType]]) -> dict[str, Any]:
    out = dict(values)
    for name, column in columns:
        if name in out:
            out[name] = to_text(out[name], column)
    return out


def _statement(cur: Cursor, table: TargetTable, kind: str, columns: tuple[str, ...], python: bool) -> str:
    """The SQL text of a delete, upsert or partial update of `columns`, built once per table."""
    statements = table.plan.statements
    statement = statements.get((kind, columns, python))
    if statement is None:
        build = {"delete": _delete_sql, "upsert": _upsert_sql, "update": _update_sql}[kind]
        statement = statements[(kind, columns, python)] = build(
            table, columns, table.plan.conversions[python]
        ).as_string(cur)
    return statement


def _raw(text: str) -> sql.SQL:
    return sql.SQL(text.replace("%", "%%"))  # the statements take parameters: a literal % is doubled


def _recordset(columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("json_to_recordset(%s::json) AS x({})").format(
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), _raw(conversions[c].field_type)) for c in columns)
    )


def _numbered_recordset(columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("ROWS FROM (json_to_recordset(%s::json) AS ({})) WITH ORDINALITY AS x({}, {})").format(
        sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), _raw(conversions[c].field_type)) for c in columns
        ),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.Identifier(_ORDINAL),
    )


def _value(column: str, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    # the type text comes from the target's own catalog (format_type), already quoted where needed
    return _raw(conversions[column].expression).format(sql.SQL("x.") + sql.Identifier(column))


def _key_match(table: TargetTable, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{} = {}").format(sql.Identifier(k), _value(k, conversions)) for k in table.key
    )


def _delete_sql(table: TargetTable, key: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("DELETE FROM {} AS t USING {} WHERE {}").format(
        table.name.ident, _recordset(key, conversions), _key_match(table, conversions)
    )


def _upsert_sql(table: TargetTable, columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    updates = [c for c in columns if c not in table.key]
    conflict = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
        )
        if updates
        else sql.SQL("DO NOTHING")
    )
    return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) {}").format(
        table.name.ident,
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(_value(c, conversions) for c in columns),
        _recordset(columns, conversions),
        sql.SQL(", ").join(map(sql.Identifier, table.key)),
        conflict,
    )


def _update_sql(table: TargetTable, columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    """Unchanged TOAST columns: only an existing row can be updated; it keeps those values."""
    updates = [c for c in columns if c not in table.key]
    return sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {} RETURNING x.{}").format(
        table.name.ident,
        sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), _value(c, conversions)) for c in updates)
        if updates
        else sql.SQL("{0} = t.{0}").format(sql.Identifier(table.key[0])),
        _numbered_recordset(columns, conversions),
        _key_match(table, conversions),
        sql.Identifier(_ORDINAL),
    )


_ORIGIN = "zdm old "  # a key move's payload: the old row's key columns, beside the new row's values
_ORIGIN_LSN = "zdm deleted at lsn"  # ... or the LSN of the delete that ended the previous batch (not a column)


def _origin(column: str) -> str:
    return _ORIGIN + column


def _column_of(field_name: str) -> str:
    return field_name.removeprefix(_ORIGIN)


def _origin_values(table: TargetTable, origin: _Origin) -> dict[str, Any]:
    key = origin.key or {}
    return {**{_origin(k): key.get(k) for k in table.key}, _ORIGIN_LSN: origin.lsn}


def _stash_names(table: TargetTable) -> tuple[sql.Identifier, sql.Identifier]:
    """Two tables shaped like `table`: a temporary one for the old rows of a segment's key moves, copied
    before its deletes; and one in the state schema keeping the row a batch's last delete removed, with
    that delete's LSN, for a move whose create starts the next batch."""
    name = state.KEPT_ROWS_PREFIX + hashlib.sha256(table.label.encode()).hexdigest()[:16]
    return sql.Identifier(name), sql.Identifier(state.SCHEMA, name)


def _keys_match(
    table: TargetTable, conversions: Mapping[str, SqlConversion], alias: str, prefix: str
) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}").format(
            sql.Identifier(alias),
            sql.Identifier(k),
            _raw(conversions[k].expression).format(sql.SQL("x.") + sql.Identifier(prefix + k)),
        )
        for k in table.key
    )


def _cached(table: TargetTable, name: tuple[Any, ...], build: Any, cur: Cursor) -> str:
    statements = table.plan.statements
    statement = statements.get(name)
    if statement is None:
        statement = statements[name] = build().as_string(cur)
    return statement


def _stash_statement(cur: Cursor, table: TargetTable, python: bool) -> str:
    conversions = table.plan.conversions[python]
    aside, kept = _stash_names(table)
    return _cached(
        table,
        ("stash", python),
        lambda: sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {aside} (LIKE {t}) ON COMMIT DELETE ROWS; DELETE FROM {aside};"
            " CREATE TABLE IF NOT EXISTS {kept} ({lsn} bigint, LIKE {t});"
            " INSERT INTO {aside} SELECT t.* FROM {t} AS t, {keys} WHERE {match}"
        ).format(
            aside=aside,
            kept=kept,
            lsn=sql.Identifier(_ORIGIN_LSN),
            t=table.name.ident,
            keys=_recordset(table.key, conversions),
            match=_key_match(table, conversions),
        ),
        cur,
    )


def _keep_statement(cur: Cursor, table: TargetTable, python: bool, *, aside: bool) -> str:
    """Keep (only) the row the batch's last delete removes, with the delete's LSN: from the copy made
    aside (`aside`, after the deletes), or from the table itself (before them)."""
    conversions = table.plan.conversions[python]
    aside_table, kept = _stash_names(table)
    fields = [*table.key, _ORIGIN_LSN]
    return _cached(
        table,
        ("keep", aside, python),
        lambda: sql.SQL(
            "CREATE TABLE IF NOT EXISTS {kept} ({lsn} bigint, LIKE {t}); DELETE FROM {kept};"
            " INSERT INTO {kept} SELECT x.{lsn}, m.* FROM {source} AS m,"
            " json_to_recordset(%s::json) AS x({types}) WHERE {match}"
        ).format(
            kept=kept,
            t=table.name.ident,
            source=aside_table if aside else table.name.ident,
            lsn=sql.Identifier(_ORIGIN_LSN),
            types=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(f), _field_type(f, conversions)) for f in fields
            ),
            match=_keys_match(table, conversions, "m", ""),
        ),
        cur,
    )


def _field_type(field_name: str, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("bigint") if field_name == _ORIGIN_LSN else _raw(conversions[_column_of(field_name)].field_type)


def _move_statement(
    cur: Cursor, table: TargetTable, columns: tuple[str, ...], kept: tuple[str, ...], python: bool
) -> str:
    """Write moved rows: the values sent, and the kept columns from the old row copied aside (this
    segment's, or the one the previous batch kept), or, when neither is there, from the new row itself
    (the move was applied before: Debezium republished it). Returns the payload's row numbers written
    (a row found nowhere is not)."""
    conversions = table.plan.conversions[python]
    fields = [*columns, *(_origin(k) for k in table.key), _ORIGIN_LSN]
    written = [*columns, *kept]
    updates = [c for c in written if c not in table.key]
    first_key = sql.Identifier(table.key[0])  # key columns are never NULL: a row was found if it is not
    aside, previous = _stash_names(table)

    def build() -> sql.Composable:
        return sql.SQL(
            "WITH src AS (SELECT x.{n}, {values}, {kept} FROM ROWS FROM (json_to_recordset(%s::json) AS ({types}))"
            " WITH ORDINALITY AS x({names}, {n}) LEFT JOIN {aside} AS m ON {old_match}"
            " LEFT JOIN {previous} AS p ON p.{lsn} = x.{lsn} LEFT JOIN {t} AS now ON {new_match}"
            " WHERE m.{k} IS NOT NULL OR p.{k} IS NOT NULL OR now.{k} IS NOT NULL),"
            " written AS (INSERT INTO {t} ({written}) OVERRIDING SYSTEM VALUE SELECT {written} FROM src"
            " ON CONFLICT ({key}) {conflict})"
            " SELECT {n} FROM src"
        ).format(
            n=sql.Identifier(_ORDINAL),
            values=sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(_value(c, conversions), sql.Identifier(c)) for c in columns
            ),
            kept=sql.SQL(", ").join(
                sql.SQL(
                    "CASE WHEN m.{k} IS NOT NULL THEN m.{c} WHEN p.{k} IS NOT NULL THEN p.{c} ELSE now.{c} END AS {c}"
                ).format(k=first_key, c=sql.Identifier(c))
                for c in kept
            ),
            types=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(f), _field_type(f, conversions)) for f in fields
            ),
            names=sql.SQL(", ").join(map(sql.Identifier, fields)),
            aside=aside,
            previous=previous,
            lsn=sql.Identifier(_ORIGIN_LSN),
            old_match=_keys_match(table, conversions, "m", _ORIGIN),
            new_match=_keys_match(table, conversions, "now", ""),
            t=table.name.ident,
            k=first_key,
            written=sql.SQL(", ").join(map(sql.Identifier, written)),
            key=sql.SQL(", ").join(map(sql.Identifier, table.key)),
            conflict=sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
            )
            if updates
            else sql.SQL("DO NOTHING"),
        )

    return _cached(table, ("move", columns, kept, python), build, cur)


def _truncate(cur: Cursor, table: TargetTable) -> None:
    # DELETE, not TRUNCATE: TRUNCATE refuses a table other tables reference, even in replica mode
    cur.execute(sql.SQL("DELETE FROM {}").format(table.name.ident))
