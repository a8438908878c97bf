"""Split a table into primary-key ranges of about equal size, without a full scan.

Boundaries are kept as text (each key column's `::text` form) so a plan can travel through
Step Functions as JSON; SQL casts them back to the key's type. Ordering always happens in
the database, so collations and type-specific orders (uuid, numeric, composite) are right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg2 import sql

from lambdas.core.catalog import TableInfo
from lambdas.core.db import Connection, fetch_all, fetch_one

INTEGER_TYPES = {"smallint", "integer", "bigint"}

Bound = tuple[str, ...]


@dataclass(frozen=True)
class KeyRange:
    """Rows with lower <= key < upper; None means unbounded on that side."""

    lower: Bound | None
    upper: Bound | None

    def to_json(self) -> dict[str, list[str] | None]:
        return {"lower": list(self.lower) if self.lower else None, "upper": list(self.upper) if self.upper else None}

    @classmethod
    def from_json(cls, data: dict[str, list[str] | None]) -> KeyRange:
        lower, upper = data.get("lower"), data.get("upper")
        return cls(tuple(lower) if lower else None, tuple(upper) if upper else None)


WHOLE_TABLE = KeyRange(None, None)


def chunk_count(estimated_rows: int, rows_per_chunk: int) -> int:
    return max(1, math.ceil(estimated_rows / max(1, rows_per_chunk)))


def ranges_from_boundaries(boundaries: Sequence[Bound]) -> list[KeyRange]:
    """Consecutive ranges covering the whole key space, split at the (sorted, distinct) boundaries."""
    points: list[Bound | None] = [None, *boundaries, None]
    return [KeyRange(points[i], points[i + 1]) for i in range(len(points) - 1)]


def pick_boundaries(sorted_sample: Sequence[Bound], chunks: int) -> list[Bound]:
    """`chunks - 1` evenly spaced, distinct keys from a sorted sample."""
    if chunks <= 1 or not sorted_sample:
        return []
    step = len(sorted_sample) / chunks
    picked: list[Bound] = []
    for i in range(1, chunks):
        candidate = sorted_sample[min(len(sorted_sample) - 1, int(i * step))]
        if not picked or candidate != picked[-1]:
            picked.append(candidate)
    return picked


def integer_boundaries(low: int, high: int, chunks: int) -> list[Bound]:
    """Boundaries splitting [low, high] into `chunks` equal-width integer ranges."""
    if chunks <= 1 or high <= low:
        return []
    width = (high - low + 1) / chunks
    points = sorted({low + int(i * width) for i in range(1, chunks)})
    return [(str(p),) for p in points if low < p <= high]


def range_predicate(
    key_columns: Sequence[str], key_types: Sequence[str], key_range: KeyRange
) -> tuple[sql.Composable, list[str]]:
    """A WHERE clause (row comparison, so composite keys work) and its parameters."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in key_columns)

    def row(bound: Bound) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("%s::") + sql.SQL(t) for t in key_types[: len(bound)])

    parts: list[sql.Composable] = []
    params: list[str] = []
    if key_range.lower is not None:
        parts.append(sql.SQL("({}) >= ({})").format(cols, row(key_range.lower)))
        params += list(key_range.lower)
    if key_range.upper is not None:
        parts.append(sql.SQL("({}) < ({})").format(cols, row(key_range.upper)))
        params += list(key_range.upper)
    if not parts:
        return sql.SQL("true"), []
    return sql.SQL(" AND ").join(parts), params


def range_predicate_literal(
    key_columns: Sequence[str], key_types: Sequence[str], key_range: KeyRange
) -> sql.Composable:
    """`range_predicate` with the bounds as quoted literals (for statements that take no parameters)."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in key_columns)

    def row(bound: Bound) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.Literal(v) + sql.SQL("::") + sql.SQL(t) for v, t in zip(bound, key_types[: len(bound)], strict=True)
        )

    parts: list[sql.Composable] = []
    if key_range.lower is not None:
        parts.append(sql.SQL("({}) >= ({})").format(cols, row(key_range.lower)))
    if key_range.upper is not None:
        parts.append(sql.SQL("({}) < ({})").format(cols, row(key_range.upper)))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def plan_ranges(conn: Connection, table: TableInfo, rows_per_chunk: int) -> list[KeyRange]:
    """Key ranges of about `rows_per_chunk` rows each, from statistics and a block sample.

    Single integer keys split min..max evenly (two index probes); other keys (uuid, text,
    composite) take boundaries from a TABLESAMPLE SYSTEM sample ordered by the database.
    A table without a primary key is one range (it cannot be split by key).
    """
    if not table.primary_key:
        return [WHOLE_TABLE]
    estimated = estimate_rows(conn, table)
    chunks = chunk_count(estimated, rows_per_chunk)
    if chunks == 1:
        return [WHOLE_TABLE]
    return ranges_from_boundaries(key_boundaries(conn, table, chunks, estimated=estimated))


def estimate_rows(conn: Connection, table: TableInfo) -> int:
    """The planner's row estimate, or a 1% block sample's for a never-analyzed table."""
    return table.estimated_rows or _sampled_row_estimate(conn, table)


def key_boundaries(
    conn: Connection,
    table: TableInfo,
    parts: int,
    *,
    estimated: int | None = None,
    samples_per_part: int = 500,
    max_samples: int | None = None,
) -> list[Bound]:
    """Up to `parts - 1` sorted, distinct keys splitting the table into parts of about equal size.

    Single integer keys: min..max split evenly. Other keys: quantiles of a block sample of about
    `samples_per_part` keys per part (at least 20,000, at most `max_samples`).
    """
    key = table.primary_key
    if parts <= 1 or not key:
        return []
    if len(key) == 1 and table.key_types[0] in INTEGER_TYPES:
        row = fetch_one(
            conn,
            sql.SQL("SELECT min({k}), max({k}) FROM {t}").format(k=sql.Identifier(key[0]), t=table.name.ident),
        )
        if row is None or row[0] is None:
            return []
        return integer_boundaries(int(row[0]), int(row[1]), parts)
    if estimated is None:
        estimated = estimate_rows(conn, table)
    # SYSTEM sampling reads whole blocks (clumps of neighbouring keys), so ask for enough rows
    # to touch many blocks; quantiles of the sorted sample then give even chunks.
    wanted_samples = max(parts * samples_per_part, 20_000)
    if max_samples is not None:
        wanted_samples = min(wanted_samples, max(max_samples, 1))
    percent = min(100.0, max(0.01, 100.0 * wanted_samples / max(estimated, 1)))
    cols = [sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in key]
    sample = fetch_all(
        conn,
        # Order by the table's columns, qualified: a bare name would pick the output column
        # (the ::text form) and sort keys as text, giving overlapping ranges.
        # The percentage as a literal, not a parameter: a '%' in a name would be taken for a placeholder.
        sql.SQL("SELECT {cols} FROM {t} AS t TABLESAMPLE SYSTEM ({pct}) ORDER BY {order}").format(
            cols=sql.SQL(", ").join(cols),
            t=table.name.ident,
            pct=sql.Literal(percent),
            order=sql.SQL(", ").join(sql.Identifier("t", c) for c in key),
        ),
    )
    return pick_boundaries([tuple(r) for r in sample], parts)


def _sampled_row_estimate(conn: Connection, table: TableInfo) -> int:
    """Rows in a never-analyzed table, from a 1% block sample (no full scan)."""
    row = fetch_one(conn, sql.SQL("SELECT count(*) * 100 FROM {} TABLESAMPLE SYSTEM (1)").format(table.name.ident))
    return int(row[0]) if row else 0
