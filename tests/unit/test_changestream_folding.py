"""Folding a segment of one table's changes into each row's net change (no database): the last change
wins, unchanged TOAST values come from earlier changes or stay as the target has them, key moves take
the old row's values."""

from __future__ import annotations

from typing import Any

from lambdas.core.changestream.connector import UNAVAILABLE_PLACEHOLDER
from lambdas.core.changestream.convert import ColumnType
from lambdas.core.changestream.events import ChangeEvent, Op, StreamPosition, StreamRecord
from lambdas.core.changestream.folding import Change, Origin, change_units, fold_rows
from lambdas.core.changestream.target import TargetTable
from lambdas.core.tables import TableName

P = UNAVAILABLE_PLACEHOLDER
ITEMS = TargetTable(
    name=TableName("public", "items"),
    key=("id",),
    columns={"id": ColumnType.of("integer"), "qty": ColumnType.of("integer"), "body": ColumnType.of("text")},
)
COLUMNS = ("id", "qty", "body")


def change(op: Op, lsn: int, **row: Any) -> Change:
    """A change at `lsn` (its own commit), marked when a value is the placeholder."""
    record = StreamRecord("t", 0, lsn, None, None)
    key = {"id": row["id"]}
    event = ChangeEvent(
        op, "public", "items", key, None if op is Op.DELETE else row, StreamPosition(lsn, lsn), lsn, 0, None
    )
    return Change(record, event, marked=P in row.values())


def test_a_rows_changes_fold_into_its_last_state() -> None:
    # Given an insert, two updates and another row's insert then delete
    changes = [
        change(Op.CREATE, 10, id=1, qty=1, body="a"),
        change(Op.UPDATE, 11, id=1, qty=2, body="b"),
        change(Op.CREATE, 12, id=2, qty=1, body="x"),
        change(Op.UPDATE, 13, id=1, qty=3, body="c"),
        change(Op.DELETE, 14, id=2),
    ]
    # When they are folded
    rows = fold_rows(ITEMS, changes)
    # Then row 1 is one upsert of its last values, row 2 one delete
    assert rows.upserts == {(COLUMNS, ()): [(1, {"id": 1, "qty": 3, "body": "c"})]}
    assert rows.deletes == [(2, {"id": 2})]
    assert rows.moves == {} and rows.trailing_delete is None


def test_an_unchanged_toast_value_comes_from_an_earlier_change_or_stays_on_the_target() -> None:
    # Given row 1 inserted then updated without its body (unchanged TOAST), and row 2 only updated so
    changes = [
        change(Op.CREATE, 10, id=1, qty=1, body="big"),
        change(Op.UPDATE, 11, id=1, qty=2, body=P),
        change(Op.UPDATE, 12, id=2, qty=5, body=P),
    ]
    rows = fold_rows(ITEMS, changes)
    # Then row 1 takes the body inserted in the batch; row 2 keeps the target's body (a partial update)
    assert rows.upserts[(COLUMNS, ())] == [(1, {"id": 1, "qty": 2, "body": "big"})]
    assert rows.upserts[(("id", "qty"), ("body",))] == [(2, {"id": 2, "qty": 5})]


def test_a_key_move_takes_the_old_rows_unchanged_values() -> None:
    # Given a key-changing UPDATE of a row whose body did not change: a delete and a create at one LSN
    moved = [change(Op.DELETE, 20, id=1), change(Op.CREATE, 20, id=7, qty=4, body=P)]
    # When folded alone: the new row is written from the old one, found on the target by its old key
    rows = fold_rows(ITEMS, moved)
    assert rows.moves == {(("id", "qty"), ("body",)): [(7, {"id": 7, "qty": 4}, Origin({"id": 1}, 20))]}
    assert rows.deletes == [(1, {"id": 1})]
    # And after the old row's insert in the same batch: the body comes from that insert
    rows = fold_rows(ITEMS, [change(Op.CREATE, 19, id=1, qty=1, body="big"), *moved])
    assert rows.upserts[(COLUMNS, ())] == [(7, {"id": 7, "qty": 4, "body": "big"})]
    assert rows.moves == {}
    # And the move is one unit when changes are applied one by one
    assert [len(unit) for unit in change_units([change(Op.UPDATE, 18, id=3, qty=1, body="b"), *moved])] == [1, 2]


def test_a_segment_ending_in_a_delete_keeps_that_row_for_a_move_the_next_batch_completes() -> None:
    # Given a segment whose last change deletes a row it did not touch before
    rows = fold_rows(ITEMS, [change(Op.UPDATE, 30, id=2, qty=1, body="b"), change(Op.DELETE, 31, id=1)])
    # Then that delete's key and LSN are kept (its create may start the next batch)
    assert rows.trailing_delete == ({"id": 1}, 31)
    # And a segment starting with a create that lacks a value looks the old row up by the LSN it carries
    rows = fold_rows(ITEMS, [change(Op.CREATE, 31, id=9, qty=2, body=P)])
    assert rows.moves == {(("id", "qty"), ("body",)): [(9, {"id": 9, "qty": 2}, Origin(None, 31))]}
