"""Two definitions of one table compared column by column: what the copy and the apply can carry.

Pure (no I/O): preflight compares the schemas before anything starts, and the engines' status compares
them again while replication runs (DDL run on one side after the start is not replicated).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from lambdas.core.catalog import Column, Partition, TableInfo
from lambdas.core.tables import TableName

Severity = Literal["fail", "warn"]  # fail: the copy or the apply stops or loses data; warn: it carries on


@dataclass(frozen=True)
class Sides:
    """What messages call the side replication reads from and the side it writes to: after the cutover the
    back replication reads from the target, and a difference is named by the database it is on."""

    publisher: str = "source"
    subscriber: str = "target"


FORWARD_SIDES = Sides()
REVERSE_SIDES = Sides("target", "source")


def join_names(items: Iterable[object]) -> str:
    """Names for a message, comma-separated."""
    return ", ".join(str(i) for i in items)


_INT_RANK = {"smallint": 1, "integer": 2, "bigint": 3}
_VARCHAR_RE = re.compile(r"^character varying(?:\((\d+)\))?$")
_NUMERIC_RE = re.compile(r"^numeric(?:\((\d+),(\d+)\))?$")


def is_safe_widening(source_type: str, target_type: str) -> bool:
    """Whether every source value fits the target type and keeps its text form (so validation agrees)."""
    if source_type in _INT_RANK and target_type in _INT_RANK:
        return _INT_RANK[target_type] >= _INT_RANK[source_type]
    if source_type in _INT_RANK and target_type == "numeric":
        return True
    src_vc, tgt_vc = _VARCHAR_RE.match(source_type), _VARCHAR_RE.match(target_type)
    if src_vc and (
        target_type == "text"
        or (
            tgt_vc
            and (
                tgt_vc.group(1) is None
                or (src_vc.group(1) is not None and int(tgt_vc.group(1)) >= int(src_vc.group(1)))
            )
        )
    ):
        return True
    src_num, tgt_num = _NUMERIC_RE.match(source_type), _NUMERIC_RE.match(target_type)
    if src_num and tgt_num and src_num.group(1) is not None:
        if tgt_num.group(1) is None:
            return True
        return tgt_num.group(2) == src_num.group(2) and int(tgt_num.group(1)) >= int(src_num.group(1))
    return False


def compare_table(source: TableInfo, target: TableInfo, sides: Sides = FORWARD_SIDES) -> list[tuple[Severity, str]]:
    """Column-by-column differences (name, type, nullability), each with how bad it is (`source` is the
    side rows come from, named in the messages as `sides` says)."""
    p, s = sides.publisher, sides.subscriber
    found: list[tuple[Severity, str]] = []
    tgt_cols: dict[str, Column] = {c.name: c for c in target.columns}
    src_cols: dict[str, Column] = {c.name: c for c in source.columns}
    t = source.name
    for col in source.columns:
        other = tgt_cols.get(col.name)
        if other is None:
            found.append(("fail", f"{t}.{col.name}: missing on the {s} ({p} type {col.type})"))
            continue
        if other.generated != col.generated:
            found.append(
                (
                    "fail",
                    f"{t}.{col.name}: "
                    + (
                        f"generated on the {p}, a plain column on the {s} (neither the copy nor the "
                        "replication carries generated values: it would be NULL)"
                        if col.generated
                        else f"a plain column on the {p}, generated on the {s} (the copy cannot write it)"
                    ),
                )
            )
        if other.type != col.type:
            if is_safe_widening(col.type, other.type):
                found.append(("warn", f"{t}.{col.name}: type {col.type} on the {p}, {other.type} on the {s} (wider)"))
            else:
                found.append(("fail", f"{t}.{col.name}: type {col.type} on the {p}, {other.type} on the {s}"))
        if other.not_null and not col.not_null:
            found.append(("fail", f"{t}.{col.name}: NOT NULL on the {s} but nullable on the {p}"))
        elif col.not_null and not other.not_null:
            found.append(("warn", f"{t}.{col.name}: nullable on the {s} but NOT NULL on the {p}"))
    # The apply finds a row by the target's replica identity index, else its primary key (whatever the
    # target's REPLICA IDENTITY setting); without either only a REPLICA IDENTITY FULL source works.
    target_by_index = target.replica_identity == "i" and target.replica_identity_index is not None
    target_key = bool(target.primary_key) and not target.primary_key_deferrable
    if source.replica_identity != "f" and source.has_usable_identity:
        if not (target_by_index or target_key):
            found.append(
                (
                    "fail",
                    f"{t}: no primary key or replica identity index on the {s}: the apply of the first UPDATE or "
                    f"DELETE stops (the {p} sends only its key, the {s} cannot find the row)",
                )
            )
        elif source.replica_identity == "d" and not target_by_index:
            extra = [c for c in target.primary_key if c not in source.primary_key]
            if extra:
                found.append(
                    (
                        "fail",
                        f"{t}: the {s}'s primary key has column(s) {join_names(extra)} that the {p}'s "
                        f"({join_names(source.primary_key)}) lacks: the {p} does not send them with an UPDATE or "
                        "DELETE, and the apply stops",
                    )
                )
    for col in target.columns:
        if col.name in src_cols:
            continue
        if col.not_null and not col.has_default:
            found.append(("fail", f"{t}.{col.name}: extra {s} column, NOT NULL without a default"))
        else:
            found.append(("warn", f"{t}.{col.name}: extra {s} column ({col.type}), not on the {p}"))
    return found


DRIFT_SHOWN = 10  # differences named in a status problem; the rest are counted


def schema_drift(
    source: Mapping[TableName, TableInfo],
    target: Mapping[TableName, TableInfo],
    tables: Iterable[TableName],
    sides: Sides = FORWARD_SIDES,
) -> list[str]:
    """The blocking differences between the tables' definitions as they are now on each side. A table gone
    from the source is left out: the engines' publication checks name it."""
    found: list[str] = []
    for name in tables:
        src = source.get(name)
        if src is None:
            continue
        tgt = target.get(name)
        if tgt is None:
            found.append(f"{name}: missing on the {sides.subscriber}")
            continue
        found += [text for severity, text in compare_table(src, tgt, sides) if severity == "fail"]
    return found


def drift_problem(found: Sequence[str], sides: Sides = FORWARD_SIDES) -> str:
    """One status problem naming the differences DDL run after the start left behind."""
    shown = "; ".join(found[:DRIFT_SHOWN])
    if len(found) > DRIFT_SHOWN:
        shown += f"; and {len(found) - DRIFT_SHOWN} more"
    return (
        f"the schemas no longer match: {shown}. DDL is not replicated: make the same change on the "
        f"{sides.subscriber} as on the {sides.publisher} (until then the apply stops or rejects rows)"
    )


def partitions_missing(
    source: Mapping[TableName, Sequence[Partition]],
    target: Mapping[TableName, Sequence[Partition]],
    sides: Sides = FORWARD_SIDES,
) -> list[str]:
    """Partitions under a replicated partitioned table that the source has and the target lacks, where the
    target is partitioned the same way (its partitions' names are all the source's) and no DEFAULT partition
    there would take their rows: a row routed to one stops the apply ("no partition of relation ... found
    for row"). Typically next month's partition, created on the source by a scheduled job after the start.
    A target partitioned its own way is left alone (preflight's partitions check says it may be)."""
    found: list[str] = []
    for root, parts in source.items():
        theirs = {p.name: p for p in target.get(root, ())}
        if not theirs or not set(theirs) <= {p.name for p in parts}:
            continue
        on_target = {root, *theirs}
        with_default = {p.parent for p in theirs.values() if p.bound == "DEFAULT"}
        found += [
            f"{p.name}: a partition of {p.parent} on the {sides.publisher} only (a row routed to it stops the apply): "
            f"CREATE TABLE {p.name} PARTITION OF {p.parent} {p.bound}"
            for p in parts
            if p.name not in theirs and p.parent in on_target and p.parent not in with_default
        ]
    return found
