"""Planning without a database: which tables, what both sides share, how a key space is cut.

A table's key space is cut into slices of about `slice_rows` rows (boundaries from
`ranges.key_boundaries`: min/max arithmetic for an integer key, a block sample's quantiles
otherwise), and consecutive slices are grouped into chunks of about `chunk_rows`. A chunk is
one Map item; inside that task it is compared in much smaller ranges sized at run time
(`chunk`), so a difference costs a re-read of a few rows, not of the chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lambdas.core.catalog import TableInfo
from lambdas.core.config import Validation
from lambdas.core.ranges import Bound, KeyRange
from lambdas.core.tables import TableName
from lambdas.core.validation.model import (
    ChunkSpec,
    ColumnSpec,
    RangeSpec,
    Replication,
    RowHash,
    TableSpec,
    ValueHash,
)


def tables_to_compare(selected: Iterable[TableName], source: Mapping[TableName, TableInfo]) -> list[TableName]:
    """The selected tables, minus partitions with a selected partitioned ancestor (it reads them). A plain
    inheritance child is a table of its own, compared on its own rows, as the copy moves them (ONLY)."""
    chosen = sorted(set(selected))
    chosen_oids = {source[t].oid for t in chosen if t in source}
    return [
        t
        for t in chosen
        if t not in source or not (source[t].is_partition and chosen_oids & set(source[t].ancestor_oids))
    ]


_VALUE_HASHES = {
    "smallint": ValueHash.INTEGER,
    "integer": ValueHash.INTEGER,
    "bigint": ValueHash.INTEGER,
    "timestamp without time zone": ValueHash.TIMESTAMP,
    "timestamp with time zone": ValueHash.TIMESTAMPTZ,
    "uuid": ValueHash.UUID,
}


def value_hash(source_type: str, target_type: str) -> ValueHash:
    """How a column present on both sides enters the fast row hash: by value when both types are of
    one kind in `_VALUE_HASHES` (a timestamp's precision aside), else by text form."""
    kinds = {_VALUE_HASHES.get(re.sub(r"\(\d+\)", "", t), ValueHash.TEXT) for t in (source_type, target_type)}
    return kinds.pop() if len(kinds) == 1 else ValueHash.TEXT


def _key_text(columns: Sequence[str]) -> str:
    return "(" + ", ".join(columns) + ")" if columns else "none"


def table_spec(
    name: TableName, source: TableInfo | None, target: TableInfo | None, row_hash: RowHash, estimated_rows: int = 0
) -> TableSpec:
    """What can be compared: the columns both sides have (in the source's order), and every schema difference.

    A table missing on one side, or whose primary keys differ, cannot be compared row by row and
    is reported as a problem. Columns present on one side only are problems too (their data is not
    on the other side), and the remaining columns are still compared.
    """

    def unusable(problem: str) -> TableSpec:
        return TableSpec(
            schema_name=name.schema, name=name.name, row_hash=row_hash, comparable=False, problems=[problem]
        )

    if source is None:
        return unusable("not found on the source")
    if target is None:
        return unusable("missing on the target")
    unreadable = [side for side, info in (("source", source), ("target", target)) if not info.readable]
    if unreadable:
        return unusable(
            f"this role may not SELECT from it on the {' and the '.join(unreadable)}; GRANT SELECT ON "
            f"{name} TO the role there"
        )
    hidden = [side for side, info in (("source", source), ("target", target)) if info.row_security_active]
    if hidden:
        # PostgreSQL filters silently: compared, both sides' visible rows could agree while hidden ones differ.
        return unusable(
            f"row-level security policies hide rows from this role on the {' and the '.join(hidden)}, so not "
            "every row can be read; give the role BYPASSRLS or connect as the table's owner (and ALTER TABLE ... "
            "NO FORCE ROW LEVEL SECURITY while validating)"
        )
    if source.primary_key != target.primary_key:
        return unusable(
            f"primary keys differ: source {_key_text(source.primary_key)}, "
            f"target {_key_text(target.primary_key)}; make the target's key match the source's"
        )
    if source.key_types != target.key_types:
        return unusable(
            f"key column types differ: source {_key_text(source.key_types)}, target {_key_text(target.key_types)}"
        )
    problems: list[str] = []
    target_columns = {c.name: c for c in target.columns}
    source_names = {c.name for c in source.columns}
    columns: list[ColumnSpec] = []
    for column in source.columns:
        other = target_columns.get(column.name)
        if other is None:
            continue
        if other.type != column.type:
            problems.append(
                f"column {column.name} is {column.type} on the source, {other.type} on the target "
                "(compared by text form)"
            )
        columns.append(ColumnSpec(name=column.name, type=column.type, hash=value_hash(column.type, other.type)))
    only_source = [c.name for c in source.columns if c.name not in target_columns]
    only_target = [c.name for c in target.columns if c.name not in source_names]
    if only_source:
        problems.append(f"columns only on the source (not compared, their data is not on the target): {only_source}")
    if only_target:
        problems.append(f"columns only on the target (not compared): {only_target}")
    return TableSpec(
        schema_name=name.schema,
        name=name.name,
        row_hash=row_hash,
        only=source.relkind == "r" and target.relkind == "r",
        key=list(source.primary_key),
        key_types=list(source.key_types),
        columns=columns,
        estimated_rows=estimated_rows,
        problems=problems,
    )


def effective_slice_rows(settings: Validation) -> int:
    return max(1, min(settings.slice_rows, settings.chunk_rows))


def slices_per_chunk(settings: Validation) -> int:
    return max(1, round(settings.chunk_rows / effective_slice_rows(settings)))


def group_slices(boundaries: Sequence[Bound], per_chunk: int) -> list[tuple[KeyRange, list[Bound]]]:
    """Consecutive slices (cut at `boundaries`) grouped `per_chunk` at a time: (chunk range, inner boundaries).

    The first chunk starts unbounded and the last ends unbounded, so rows outside the sampled
    key space (e.g. extra rows on the target) still fall in a chunk.
    """
    per_chunk = max(1, per_chunk)
    points: list[Bound | None] = [None, *boundaries, None]
    slices = len(points) - 1
    grouped: list[tuple[KeyRange, list[Bound]]] = []
    for start in range(0, slices, per_chunk):
        end = min(start + per_chunk, slices)
        inner = [b for b in points[start + 1 : end] if b is not None]
        grouped.append((KeyRange(points[start], points[end]), inner))
    return grouped


# A key in no physical order (random uuids or integers, hashes, emails): each key range's rows lie on pages all over the table,
# so reading the table by key ranges reads every page over and over (10M rows, 256 MB of buffers: 9.3x
# a scan). Such a table is compared by one scan per side in buckets of the key instead (`ChunkSpec.bucket_bits`).
BUCKET_BITS = 10  # buckets a chunk compares at least; one more bit per doubling of `Validation.bucket_scan_max_rows`
BUCKET_SCAN_MAX_CORRELATION = 0.5  # |pg_stats.correlation| of the key column below which it is in no order
# Past `MAX_BUCKET_BITS` (6.4B rows at the default), key ranges over many tasks.
MAX_BUCKET_BITS = 16
MAX_SCAN_WORKERS = 8


@dataclass(frozen=True)
class BucketScan:
    """How a table in no key order is compared: in `2**bits` buckets of its key, split into `groups`
    chunks (a power of 2), each scanning the whole table for the rows of its share of the buckets."""

    bits: int
    groups: int


def bucket_scan_shape(
    spec: TableSpec, correlation: float | None, estimated_rows: int, max_rows: int, max_parallel_chunks: int
) -> BucketScan | None:
    """The buckets and groups when the table is compared by scans in key buckets, else None (key ranges).

    A bucket holds about `max_rows` / 1,024 rows: `BUCKET_BITS`, plus one bit per doubling of `max_rows`
    rows. `max_rows` is what one scan process hashes in a task; a task's scan uses up to
    `MAX_SCAN_WORKERS` of the `max_parallel_chunks` processes a side (parallel query), so the table is
    split in groups only past that many rows per process. Each group scans the whole table: a second
    group costs the database a second full scan per side, and with no more processes to share, one
    task with all of them finishes no later than two with half each.

    Only for a key whose (first column's) physical order the statistics show to be random: without
    statistics (never analyzed) the table keeps key ranges, which are right for any order.
    """
    if spec.multiset or not spec.key or correlation is None:
        return None
    if abs(correlation) >= BUCKET_SCAN_MAX_CORRELATION:
        return None
    max_rows = max(1, max_rows)
    processes = max(1, min(max_parallel_chunks, MAX_SCAN_WORKERS))
    group_bits = _doublings(estimated_rows, max_rows * processes)
    bits = BUCKET_BITS + max(_doublings(estimated_rows, max_rows), group_bits)  # at least 1,024 buckets a group
    return BucketScan(bits, 1 << group_bits) if bits <= MAX_BUCKET_BITS else None


def _doublings(rows: int, per: int) -> int:
    """How many times `per` must double to hold `rows` (0 when it already does)."""
    return (max(1, -(-rows // per)) - 1).bit_length()


def chunk_specs(
    spec: TableSpec,
    boundaries: Sequence[Bound],
    settings: Validation,
    replication: Replication | None = None,
    *,
    bucket_scan: BucketScan | None = None,
) -> list[ChunkSpec]:
    """The Map items for one table. A table without a key is one chunk (it has no order to cut), and so
    is one compared by one scan in key buckets, or one chunk per group of buckets (`bucket_scan_shape`),
    each with its share of the scan processes a side."""
    if not spec.comparable:
        return []
    if bucket_scan is not None:
        bucket_bits, bucket_groups = bucket_scan.bits, bucket_scan.groups
        concurrent = min(bucket_groups, settings.max_parallel_chunks)
        return [
            ChunkSpec(
                table=spec,
                number=group,
                chunks=bucket_groups,
                slice_rows=effective_slice_rows(settings),
                first_keys=settings.report_first_keys,
                replication=replication,
                bucket_bits=bucket_bits,
                scan_workers=max(1, min(settings.max_parallel_chunks // concurrent, MAX_SCAN_WORKERS)),
                bucket_groups=bucket_groups,
                bucket_group=group,
            )
            for group in range(bucket_groups)
        ]
    whole = spec.multiset
    groups = [(KeyRange(None, None), [])] if whole else group_slices(boundaries, slices_per_chunk(settings))
    return [
        ChunkSpec(
            table=spec,
            number=i,
            chunks=len(groups),
            range=RangeSpec.of(key_range),
            slices=[list(b) for b in inner],
            slice_rows=effective_slice_rows(settings),
            first_keys=settings.report_first_keys,
            replication=replication,
        )
        for i, (key_range, inner) in enumerate(groups)
    ]
