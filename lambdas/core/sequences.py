"""Copy sequence positions from one side to the other (logical replication does not carry them)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg2.errors
from psycopg2 import sql

from lambdas.core.catalog import sequences_for_tables
from lambdas.core.db import Connection, fetch_one, fetch_value
from lambdas.core.tables import TableName


@dataclass(frozen=True)
class SequencePosition:
    next_value: int  # what nextval() would return
    increment: int


@dataclass(frozen=True)
class SequenceSync:
    sequence: TableName
    source_next: int
    target_next_before: int
    target_next_after: int

    @property
    def changed(self) -> bool:
        return self.target_next_after != self.target_next_before


class SequenceSyncError(RuntimeError):
    pass


def read_position(conn: Connection, sequence: TableName) -> SequencePosition:
    # Not pg_sequences.last_value: it is NULL when is_called is false (after setval(s, n, false) or
    # ALTER SEQUENCE ... RESTART WITH n: the next value is then last_value itself, not the start) and
    # when the role may not read the sequence (then reading it must fail, not pass for "start").
    row = fetch_one(
        conn,
        "SELECT increment_by FROM pg_sequences WHERE schemaname = %s AND sequencename = %s",
        (sequence.schema, sequence.name),
    )
    if row is None:
        raise SequenceSyncError(f"sequence {sequence} does not exist here: create it (the schema must match)")
    increment = int(row[0])
    try:
        state = fetch_one(conn, sql.SQL("SELECT last_value, is_called FROM {}").format(sequence.ident))
    except psycopg2.errors.InsufficientPrivilege as exc:
        raise SequenceSyncError(
            f"sequence {sequence}: this role may not read it; GRANT SELECT, UPDATE ON SEQUENCE {sequence} to the "
            "migration's role on both databases"
        ) from exc
    if state is None:  # pragma: no cover - a sequence always has its one row
        raise SequenceSyncError(f"sequence {sequence} has no state row")
    last, is_called = state
    next_value = last + increment if is_called else last
    return SequencePosition(int(next_value), increment)


def sync_sequences(
    source: Connection, target: Connection, tables: Iterable[TableName], *, margin: int = 0
) -> list[SequenceSync]:
    """Move every sequence used by `tables` on the target to at least the source's next value + margin.

    Never moves a target sequence backwards: running it twice, or after the target has
    handed out values itself, cannot produce a duplicate key.
    """
    sequences = sorted({use.sequence for use in sequences_for_tables(source, tables)})
    results: list[SequenceSync] = []
    for sequence in sequences:
        src = read_position(source, sequence)
        if src.increment < 0:
            raise SequenceSyncError(f"sequence {sequence} counts down (increment {src.increment}); not supported")
        before = read_position(target, sequence)
        wanted = src.next_value + margin
        after = before.next_value
        if before.next_value < wanted:
            # setval(v, true): nextval() then returns v + increment.
            fetch_value(target, "SELECT setval(%s::regclass, %s, true)", (sequence.regclass, wanted - before.increment))
            after = read_position(target, sequence).next_value
        results.append(SequenceSync(sequence, src.next_value, before.next_value, after))
    return results
