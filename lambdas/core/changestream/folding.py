"""A segment of a table's changes folded into each row's net change (`fold_rows`), key moves paired
with the rows they come from: pure logic over the events, no database."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lambdas.core.changestream.convert import is_unavailable
from lambdas.core.changestream.events import ChangeEvent, Op, StreamRecord
from lambdas.core.changestream.target import TargetTable


@dataclass(slots=True)
class Change:
    record: StreamRecord
    event: ChangeEvent
    marked: bool = False  # the record may carry the unchanged-TOAST placeholder: its values are checked


def change_units(changes: Sequence[Change]) -> list[list[Change]]:
    """Changes one by one, but a key move (a delete and a create at the same position) kept together:
    the create may need the old row's unchanged TOAST values."""
    units: list[list[Change]] = []
    for change in changes:
        event = change.event
        if units and len(units[-1]) == 1 and is_move_pair(units[-1][0].event, event):
            units[-1].append(change)
            continue
        units.append([change])
    return units


def is_move_pair(previous: ChangeEvent, event: ChangeEvent) -> bool:
    """Whether `event` is the create that goes with the delete `previous`: a key-changing UPDATE (both at
    one LSN, the create right after the delete in the partition)."""
    return previous.op is Op.DELETE and event.op is Op.CREATE and event.lsn is not None and previous.lsn == event.lsn


def row_of(table: TargetTable, event: ChangeEvent) -> Hashable | None:
    """The fold key of the row a change touches; None when it does not say (a change with a schema problem)."""
    values = event.key if event.op is Op.DELETE else event.after
    if not values or any(k not in values for k in table.key):
        return None
    return table.plan.row_key(values)


_NOTHING_KEPT: frozenset[str] = frozenset()
_Shape = tuple[tuple[str, ...], tuple[str, ...]]  # (columns written, columns kept as they are on the target)
# A row's net change while folding: its values as Debezium sent them, the columns to keep as a target row
# has them (None: the row is deleted), and which row that is when not the row itself (a key move's old row).
_FoldState = tuple[Mapping[str, Any], frozenset[str] | None, "Origin | None"]
_NO_ROW: _FoldState = ({}, None, None)


class Origin(NamedTuple):
    """Where a moved row's unchanged TOAST values are: the old row, by its key (in this batch, or on the
    target), or the old row the previous batch ended by deleting, by that delete's LSN."""

    key: Mapping[str, Any] | None
    lsn: int | None = None


@dataclass
class Rows:
    """A segment's net changes, each row with its fold key and its values as Debezium sent them."""

    deletes: list[tuple[Hashable, Mapping[str, Any]]] = field(default_factory=list)  # the key columns' values
    upserts: dict[_Shape, list[tuple[Hashable, Mapping[str, Any]]]] = field(default_factory=dict)
    # rows that moved to a new key with unchanged TOAST values: (fold key, values, where the old row is)
    moves: dict[_Shape, list[tuple[Hashable, Mapping[str, Any], Origin]]] = field(default_factory=dict)
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
    values: dict[str, Any],
    unavailable: frozenset[str],
    old_key: Mapping[str, Any],
    old: _FoldState | None,
    lsn: int | None,
) -> _FoldState:
    """The new row of a key-changing UPDATE whose unchanged TOAST values Debezium did not send: they are
    the old row's, from its state earlier in the batch, else from the target's row (or its own origin),
    else the row an earlier batch kept when it applied this move's delete (`lsn`: the delete was published
    again by a restarted connector, which had published no create after it the first time)."""
    if old is None or old[1] is None:
        return values, unavailable, Origin(old_key, lsn)
    old_values, _, old_origin = old
    filled = {c: old_values[c] for c in unavailable if c in old_values}
    kept = frozenset(c for c in unavailable if c not in old_values)
    return {**filled, **values}, kept, (old_origin or Origin(old_key, lsn)) if kept else None


def fold_rows(table: TargetTable, changes: Sequence[Change]) -> Rows:
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
        if unavailable and moved_from and is_move_pair(moved_from[0], event):
            rows[key] = _moved(dict(values), unavailable, moved_from[1], moved_from[2], event.lsn)
            continue
        if unavailable and event.op is Op.CREATE and position == 0 and event.lsn is not None:
            rows[key] = (values, unavailable, Origin(None, event.lsn))
            continue
        prev_values, prev_kept, prev_origin = rows.get(key, _NO_ROW)
        origin = None
        # after an earlier upsert of this row in the batch: merged, unless this change has every column
        if prev_kept is not None and (unavailable or prev_kept or not values.keys() >= prev_values.keys()):
            keep = (prev_kept - values.keys()) | (unavailable - prev_values.keys())
            values, unavailable, origin = {**prev_values, **values}, frozenset(keep), prev_origin if keep else None
        rows[key] = (values, unavailable, origin)
    out = Rows()
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
