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
  written: the target keeps its value, or an earlier change in the same batch supplies it.
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

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import psycopg2
from psycopg2 import sql

from lambdas.core.catalog import describe_tables
from lambdas.core.changestream import state
from lambdas.core.changestream.connector import heartbeat_topic, table_topic
from lambdas.core.changestream.convert import ColumnType, ConversionError, Kind, is_unavailable, to_text
from lambdas.core.changestream.deadletters import DeadLetter, DeadLetterSink
from lambdas.core.changestream.events import (
    SNAPSHOT_END,
    TABLE_SNAPSHOT_END,
    ChangeEvent,
    Op,
    StreamRecord,
    UnparseableEvent,
    parse_record,
)
from lambdas.core.db import Connection, Cursor
from lambdas.core.tables import TableName

_MAX_LETTER_CHARS = 100_000  # an SQS message holds 256 KB; the reason and position matter most


@dataclass(frozen=True)
class TargetTable:
    name: TableName
    key: tuple[str, ...]
    columns: Mapping[str, ColumnType]  # the columns a change may write (generated ones excluded)
    generated: frozenset[str] = frozenset()

    @cached_property
    def plain(self) -> frozenset[str]:
        """Columns whose Debezium string is already PostgreSQL's input text (no conversion)."""
        return frozenset(n for n, c in self.columns.items() if c.kind is Kind.TEXT and not c.array)


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


@dataclass
class _Change:
    record: StreamRecord
    event: ChangeEvent


@dataclass
class _RowState:
    """A row's net change over the batch so far."""

    delete: bool
    values: dict[str, Any]
    unavailable: set[str]


class ChangeApplier:
    """Applies batches of records on one target connection (autocommit off; owned by the caller)."""

    def __init__(self, target: Connection, routing: StreamRouting, sink: DeadLetterSink) -> None:
        if target.autocommit:
            raise ValueError("the applier's target connection must not be in autocommit mode")
        self._conn = target
        self.target = target
        self._routing = routing
        self._sink = sink

    def apply(self, records: Sequence[StreamRecord]) -> ApplyResult:
        result = ApplyResult(records=len(records))
        if not records:
            return result
        try:
            with self._conn.cursor() as cur:
                cur.execute("SET LOCAL session_replication_role = replica")
                cur.execute(
                    sql.SQL("SELECT applier_paused FROM {}.dbz_control WHERE id = 1 FOR SHARE").format(
                        sql.Identifier(state.SCHEMA)
                    )
                )
                row = cur.fetchone()
                if row is not None and row[0]:
                    self._conn.rollback()
                    result.paused = True
                    return result
                partitions = state.lock_partitions(cur, ((r.topic, r.partition) for r in records))
                pending: dict[str, list[_Change]] = {}
                for rec in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
                    self._admit(rec, partitions[(rec.topic, rec.partition)], pending, result)
                for topic, changes in pending.items():
                    self._apply_table(cur, self._routing.tables[topic], changes, result)
                if result.dead_letters:
                    self._record_dead_letters(cur, result.dead_letters)
                    self._sink.send(result.dead_letters)  # durable before the offsets commit
                state.save_partitions(cur, partitions.values())
                self._save_progress(cur, result)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            raise
        return result

    def _admit(
        self,
        rec: StreamRecord,
        part: state.PartitionState,
        pending: dict[str, list[_Change]],
        result: ApplyResult,
    ) -> None:
        """Decide what one record is: a replay, a tombstone, a dead letter, or a change to apply."""
        if rec.offset < part.next_offset:
            result.replayed += 1
            return
        part.next_offset = rec.offset + 1
        if rec.topic == self._routing.heartbeat_topic:
            result.snapshot_completed = True  # the connector emits heartbeats once it streams
            return
        table = self._routing.tables.get(rec.topic)
        if table is None:
            result.dead_letters.append(_letter(rec, None, f"no target table is mapped to topic {rec.topic!r}"))
            return
        try:
            event = parse_record(rec)
        except UnparseableEvent as exc:
            result.dead_letters.append(_letter(rec, None, f"unparseable event: {exc}"))
            return
        if event is None:
            result.tombstones += 1
            return
        if event.op is Op.MESSAGE:
            return
        if event.position.is_snapshot:
            if part.streaming:
                result.republished += 1
                return
        elif event.position < part.position:
            result.republished += 1
            return
        else:
            part.position = event.position
        part.events += 1
        if event.lsn is not None:
            part.last_source_lsn = event.lsn
            result.last_source_lsn = max(result.last_source_lsn or 0, event.lsn)
        if event.ts_ms is not None:
            part.last_ts_ms = event.ts_ms
            result.last_ts_ms = max(result.last_ts_ms or 0, event.ts_ms)
        progress = result.tables.setdefault(str(table.name), TableProgress())
        progress.events += 1
        if event.op is Op.READ:
            progress.snapshot_rows += 1
        if event.snapshot_marker in TABLE_SNAPSHOT_END:
            progress.snapshot_done = True
        if event.snapshot_marker == SNAPSHOT_END or not event.position.is_snapshot:
            result.snapshot_completed = True
        pending.setdefault(rec.topic, []).append(_Change(rec, event))

    def _apply_table(self, cur: Cursor, table: TargetTable, changes: list[_Change], result: ApplyResult) -> None:
        segment: list[_Change] = []
        for change in changes:
            if change.event.op is Op.TRUNCATE:
                self._apply_segment(cur, table, segment, result)
                segment = []
                self._guarded(cur, lambda: _truncate(cur, table), [change], table, result)
            else:
                segment.append(change)
        self._apply_segment(cur, table, segment, result)

    def _apply_segment(self, cur: Cursor, table: TargetTable, changes: list[_Change], result: ApplyResult) -> None:
        """Fold, then apply set-wise; on failure, change by change so that only bad ones become dead letters."""
        if not changes:
            return
        valid: list[_Change] = []
        for change in changes:
            problem = _schema_problem(table, change.event)
            if problem:
                result.dead_letters.append(_letter(change.record, change.event, problem))
            else:
                valid.append(change)
        cur.execute("SAVEPOINT zdm_batch")
        try:
            rows = _fold(table, valid)
            missing = _write_rows(cur, table, rows)
            cur.execute("RELEASE SAVEPOINT zdm_batch")
        except (psycopg2.Error, ConversionError) as exc:
            if isinstance(exc, psycopg2.Error) and not _refused_change(exc):
                raise  # not about a change: the whole batch rolls back and is delivered again
            cur.execute("ROLLBACK TO SAVEPOINT zdm_batch")
            for change in valid:
                one = _fold(table, [change]) if _convertible(table, change) else None
                if one is None:
                    result.dead_letters.append(
                        _letter(change.record, change.event, "a value cannot be converted to its column's type")
                    )
                    continue
                self._guarded(cur, lambda rows=one: _write_rows(cur, table, rows), [change], table, result)
            return
        result.applied += len(valid)
        if missing:
            by_key = {_key_of(table, c.event): c for c in valid}
            for key in missing:
                change = by_key[key]
                result.dead_letters.append(
                    _letter(
                        change.record,
                        change.event,
                        "an update with unchanged TOAST values for a row that is not on the target:"
                        " its full value cannot be rebuilt (re-run validation and fix the row)",
                    )
                )
                result.applied -= 1

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
                        "an update with unchanged TOAST values for a row that is not on the target",
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

    def _save_progress(self, cur: Cursor, result: ApplyResult) -> None:
        for name, progress in result.tables.items():
            cur.execute(
                sql.SQL(
                    "INSERT INTO {0}.dbz_tables AS t (table_name, snapshot_rows, snapshot_done, events)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (table_name) DO UPDATE SET"
                    " snapshot_rows = t.snapshot_rows + EXCLUDED.snapshot_rows,"
                    " snapshot_done = t.snapshot_done OR EXCLUDED.snapshot_done,"
                    " events = t.events + EXCLUDED.events"
                ).format(sql.Identifier(state.SCHEMA)),
                (name, progress.snapshot_rows, progress.snapshot_done, progress.events),
            )
        if result.snapshot_completed:
            cur.execute(
                sql.SQL(
                    # only the first batch to see it writes (and locks) the row
                    "UPDATE {}.dbz_stream SET snapshot_completed = true WHERE id = 1 AND NOT snapshot_completed"
                ).format(sql.Identifier(state.SCHEMA))
            )


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


def _schema_problem(table: TargetTable, event: ChangeEvent) -> str | None:
    if event.op is Op.DELETE:
        key = event.key or {}
        absent = [k for k in table.key if k not in key]
        return f"the delete's key lacks {', '.join(absent)} of {table.name}'s primary key" if absent else None
    after = event.after or {}
    unknown = sorted(c for c in after if c not in table.columns and c not in table.generated)
    if unknown:
        return (
            f"schema mismatch: column(s) {', '.join(unknown)} of the event are not on target table {table.name};"
            " add them to the target (schema changes are not replicated)"
        )
    absent = [k for k in table.key if k not in after or is_unavailable(after[k])]
    if absent:
        return f"the event lacks primary key column(s) {', '.join(absent)} of {table.name}"
    return None


def _convertible(table: TargetTable, change: _Change) -> bool:
    try:
        _fold(table, [change])
    except ConversionError:
        return False
    return True


def _key_of(table: TargetTable, event: ChangeEvent) -> tuple[str | None, ...]:
    source = event.key if event.op is Op.DELETE else event.after
    assert source is not None
    return tuple(to_text(source[k], table.columns[k]) for k in table.key)


@dataclass
class _Rows:
    deletes: list[tuple[str | None, ...]] = field(default_factory=list)
    # (columns written, columns kept as they are on the target) -> rows of text values
    upserts: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, str | None]]] = field(default_factory=dict)


def _row_text(table: TargetTable, after: dict[str, Any]) -> tuple[dict[str, str | None], set[str]]:
    """The row's values as text for their columns, and the columns Debezium did not send (unchanged TOAST).

    The hot loop of the applier: plain text-kind values (most columns) pass through untouched.
    """
    columns = table.columns
    plain = table.plain
    values: dict[str, str | None] = {}
    unavailable: set[str] = set()
    for name, value in after.items():
        column = columns.get(name)
        if column is None:
            continue  # generated on the target (checked by _schema_problem)
        if value is None:
            values[name] = None
        elif isinstance(value, (str, list, dict)) and is_unavailable(value):
            unavailable.add(name)
        elif name in plain and type(value) is str:
            values[name] = value
        else:
            values[name] = to_text(value, column)
    return values, unavailable


def _fold(table: TargetTable, changes: Sequence[_Change]) -> _Rows:
    rows: dict[tuple[str | None, ...], _RowState] = {}
    for change in changes:
        event = change.event
        if event.op is Op.DELETE:
            rows[_key_of(table, event)] = _RowState(True, {}, set())
            continue
        available, unavailable = _row_text(table, event.after or {})
        key = tuple(available[k] for k in table.key)  # _schema_problem made sure the key is there
        prev = rows.get(key)
        if prev is not None and not prev.delete:
            keep = (prev.unavailable - available.keys()) | (unavailable - prev.values.keys())
            rows[key] = _RowState(False, {**prev.values, **available}, keep)
        else:
            rows[key] = _RowState(False, available, unavailable)
    out = _Rows()
    for key, row in rows.items():
        if row.delete:
            out.deletes.append(key)
        else:
            shape = (tuple(sorted(row.values)), tuple(sorted(row.unavailable)))
            out.upserts.setdefault(shape, []).append(row.values)
    return out


def _recordset(columns: Sequence[str]) -> sql.Composable:
    return sql.SQL("jsonb_to_recordset(%s::jsonb) AS x({})").format(
        sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in columns)
    )


def _cast(table: TargetTable, column: str) -> sql.Composable:
    # the type text comes from the target's own catalog (format_type), already quoted where needed
    return sql.SQL("x.{}::{}").format(sql.Identifier(column), sql.SQL(table.columns[column].sql_type))


def _key_match(table: TargetTable) -> sql.Composable:
    return sql.SQL(" AND ").join(sql.SQL("t.{} = {}").format(sql.Identifier(k), _cast(table, k)) for k in table.key)


def _write_rows(cur: Cursor, table: TargetTable, rows: _Rows) -> list[tuple[str | None, ...]]:
    """Deletes, then upserts; returns the keys of partial updates whose row was not on the target."""
    if rows.deletes:
        cur.execute(
            sql.SQL("DELETE FROM {} AS t USING {} WHERE {}").format(
                table.name.ident, _recordset(table.key), _key_match(table)
            ),
            (json.dumps([dict(zip(table.key, k, strict=True)) for k in rows.deletes]),),
        )
    missing: list[tuple[str | None, ...]] = []
    for (columns, kept), values in rows.upserts.items():
        payload = json.dumps(values)
        if not kept:
            updates = [c for c in columns if c not in table.key]
            conflict = (
                sql.SQL("DO UPDATE SET {}").format(
                    sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
                )
                if updates
                else sql.SQL("DO NOTHING")
            )
            cur.execute(
                sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) {}").format(
                    table.name.ident,
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.SQL(", ").join(_cast(table, c) for c in columns),
                    _recordset(columns),
                    sql.SQL(", ").join(map(sql.Identifier, table.key)),
                    conflict,
                ),
                (payload,),
            )
            continue
        # Unchanged TOAST columns: only an existing row can be updated; it keeps those values.
        updates = [c for c in columns if c not in table.key]
        cur.execute(
            sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {} RETURNING {}").format(
                table.name.ident,
                sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), _cast(table, c)) for c in updates)
                if updates
                else sql.SQL("{0} = t.{0}").format(sql.Identifier(table.key[0])),
                _recordset(columns),
                _key_match(table),
                sql.SQL(", ").join(sql.SQL("x.{}").format(sql.Identifier(k)) for k in table.key),
            ),
            (payload,),
        )
        found = {tuple(r) for r in cur.fetchall()}
        missing += [k for k in (tuple(v[c] for c in table.key) for v in values) if k not in found]
    return missing


def _truncate(cur: Cursor, table: TargetTable) -> None:
    # DELETE, not TRUNCATE: TRUNCATE refuses a table other tables reference, even in replica mode
    cur.execute(sql.SQL("DELETE FROM {}").format(table.name.ident))
