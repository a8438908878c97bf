"""Validation planning, the pure parts: what both sides share, how a key space is cut, JSON round trips."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from lambdas.core.catalog import Column, TableInfo
from lambdas.core.config import Validation
from lambdas.core.ranges import KeyRange
from lambdas.core.tables import TableName
from lambdas.core.validation.model import (
    ChunkResult,
    ChunkSpec,
    RangeSpec,
    Replication,
    RowHash,
    TableSpec,
    ValidationPlan,
    ValueHash,
)
from lambdas.core.validation.plan import (
    BUCKET_BITS,
    MAX_BUCKET_BITS,
    BucketScan,
    bucket_scan_shape,
    chunk_specs,
    group_slices,
    slices_per_chunk,
    table_spec,
    tables_to_compare,
    value_hash,
)

ORDERS = TableName("public", "orders")
MAX_ROWS = Validation().bucket_scan_max_rows  # one scan process's rows in a task


def info(
    name: TableName = ORDERS,
    *,
    key: tuple[str, ...] = ("id",),
    key_types: tuple[str, ...] = ("bigint",),
    columns: tuple[tuple[str, str], ...] = (("id", "bigint"), ("status", "text"), ("total", "numeric(14,2)")),
    parent: TableName | None = None,
) -> TableInfo:
    return TableInfo(
        name=name,
        oid=1,
        relkind="r",
        persistence="p",
        replica_identity="d",
        primary_key=key,
        replica_identity_index=None,
        columns=tuple(Column(n, t, n in key) for n, t in columns),
        estimated_rows=1000,
        size_bytes=8192,
        partition_parent=parent,
        key_types=key_types,
    )


# --- table specs ------------------------------------------------------------------------------


def test_identical_tables_compare_every_column_in_the_source_order() -> None:
    # Given the same table on both sides
    source, target = info(), info()
    # When its spec is built
    spec = table_spec(ORDERS, source, target, RowHash.FAST, 1000)
    # Then every column is compared, in order, with the key and no problem
    assert spec.comparable and not spec.problems
    assert spec.column_names == ["id", "status", "total"]
    assert (spec.key, spec.key_types, spec.row_hash) == (["id"], ["bigint"], RowHash.FAST)


def test_column_order_on_the_target_does_not_matter() -> None:
    # Given the target created its columns in another order
    target = info(columns=(("total", "numeric(14,2)"), ("id", "bigint"), ("status", "text")))
    # When the spec is built / Then the source's order is used and nothing is reported
    spec = table_spec(ORDERS, info(), target, RowHash.FAST)
    assert spec.column_names == ["id", "status", "total"] and not spec.problems


def test_columns_on_one_side_only_are_problems_and_the_rest_is_still_compared() -> None:
    # Given the source has 'note' the target lacks, and the target has 'flag' the source lacks
    source = info(columns=(("id", "bigint"), ("status", "text"), ("note", "text")))
    target = info(columns=(("id", "bigint"), ("status", "text"), ("flag", "boolean")))
    # When the spec is built
    spec = table_spec(ORDERS, source, target, RowHash.MD5)
    # Then both are named and the shared columns are compared
    assert spec.comparable
    assert spec.column_names == ["id", "status"]
    assert spec.problems == [
        "columns only on the source (not compared, their data is not on the target): ['note']",
        "columns only on the target (not compared): ['flag']",
    ]


def test_a_column_type_difference_is_reported_but_compared_by_text_form() -> None:
    source = info()
    target = info(columns=(("id", "bigint"), ("status", "text"), ("total", "numeric")))
    spec = table_spec(ORDERS, source, target, RowHash.FAST)
    assert spec.column_names == ["id", "status", "total"]
    assert spec.problems == [
        "column total is numeric(14,2) on the source, numeric on the target (compared by text form)"
    ]


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("bigint", "bigint", ValueHash.INTEGER),
        ("integer", "bigint", ValueHash.INTEGER),  # the same value hashes the same in any integer width
        ("smallint", "integer", ValueHash.INTEGER),
        ("timestamp(3) with time zone", "timestamp with time zone", ValueHash.TIMESTAMPTZ),
        ("timestamp without time zone", "timestamp without time zone", ValueHash.TIMESTAMP),
        ("uuid", "uuid", ValueHash.UUID),
        ("integer", "numeric", ValueHash.TEXT),  # different kinds: compared by text form
        ("timestamp without time zone", "timestamp with time zone", ValueHash.TEXT),
        ("numeric(14,2)", "numeric(14,2)", ValueHash.TEXT),  # scale is part of the text form, not of the hash
        ("double precision", "double precision", ValueHash.TEXT),  # -0 and 0 hash alike as values
        ("text", "text", ValueHash.TEXT),
    ],
)
def test_columns_of_one_value_kind_on_both_sides_are_hashed_by_value(
    source: str, target: str, expected: ValueHash
) -> None:
    assert value_hash(source, target) is expected


def test_the_spec_carries_each_columns_hash() -> None:
    source = info(columns=(("id", "bigint"), ("status", "text"), ("at", "timestamp with time zone")))
    target = info(columns=(("id", "integer"), ("status", "text"), ("at", "timestamp with time zone")))
    spec = table_spec(ORDERS, source, target, RowHash.FAST)
    assert [c.hash for c in spec.columns] == [ValueHash.INTEGER, ValueHash.TEXT, ValueHash.TIMESTAMPTZ]


@pytest.mark.parametrize(
    ("source", "target", "problem"),
    [
        (info(), None, "missing on the target"),
        (None, info(), "not found on the source"),
        (
            info(),
            info(key=("id", "status"), key_types=("bigint", "text")),
            "primary keys differ: source (id), target (id, status); make the target's key match the source's",
        ),
        (
            info(),
            info(key_types=("integer",)),
            "key column types differ: source (bigint), target (integer)",
        ),
        (
            info(),
            info(key=(), key_types=()),
            "primary keys differ: source (id), target none; make the target's key match the source's",
        ),
    ],
)
def test_tables_that_cannot_be_compared_row_by_row(
    source: TableInfo | None, target: TableInfo | None, problem: str
) -> None:
    # Given a table missing on one side or keyed differently / When its spec is built
    spec = table_spec(ORDERS, source, target, RowHash.FAST)
    # Then it is not compared and the reason is given
    assert not spec.comparable
    assert spec.problems == [problem]
    assert chunk_specs(spec, [], Validation()) == []


def test_a_table_without_primary_key_is_a_multiset_in_one_chunk() -> None:
    # Given a keyless table on both sides
    keyless = info(key=(), key_types=())
    spec = table_spec(ORDERS, keyless, keyless, RowHash.FAST)
    # When it is planned
    chunks = chunk_specs(spec, [("5",)], Validation())
    # Then it is one chunk over everything, compared as a multiset
    assert spec.multiset and spec.comparable
    assert len(chunks) == 1 and chunks[0].slice_ranges() == [KeyRange(None, None)]


def test_partitions_of_a_selected_root_are_left_to_the_root() -> None:
    # Given a partitioned root, a partition of one of its partitions, and an unrelated table, all selected
    root, mid, leaf, other = (TableName("public", n) for n in ("m", "m_2024", "m_2024_01", "x"))
    infos = {
        root: replace(info(root), oid=10, relkind="p"),
        mid: replace(info(mid, parent=root), oid=11, relkind="p", is_partition=True, ancestor_oids=(10,)),
        leaf: replace(info(leaf, parent=mid), oid=12, is_partition=True, ancestor_oids=(11, 10)),
        other: replace(info(other), oid=13),
    }
    # When the tables to compare are chosen / Then the partitions are read through the root only
    assert tables_to_compare([leaf, other, root, mid], infos) == [root, other]
    # And a partition selected without its ancestors is compared itself
    assert tables_to_compare([leaf], infos) == [leaf]


def test_plain_inheritance_children_are_compared_as_tables_of_their_own_and_read_with_only() -> None:
    # Given a plain table and its inheritance child (not a partition), both selected
    parent, child = TableName("public", "p"), TableName("public", "c")
    infos = {
        parent: replace(info(parent), oid=20),
        child: replace(info(child, parent=parent), oid=21, ancestor_oids=(20,)),
    }
    # Then both are compared, each read with ONLY (its own rows, as the copy moves them)
    assert tables_to_compare([parent, child], infos) == [child, parent]
    spec = table_spec(parent, infos[parent], infos[parent], RowHash.FAST)
    assert spec.only
    # And a table partitioned on either side is read without ONLY (its rows are all in its partitions)
    partitioned = replace(infos[parent], relkind="p")
    assert not table_spec(parent, infos[parent], partitioned, RowHash.FAST).only


# --- cutting the key space ------------------------------------------------------------------


def test_slices_are_grouped_into_chunks_that_cover_the_whole_key_space() -> None:
    # Given 9 boundaries (10 slices) and 4 slices per chunk
    bounds = [(str(b),) for b in range(10, 100, 10)]
    # When grouped
    groups = group_slices(bounds, 4)
    # Then 3 chunks: the first starts and the last ends unbounded; each carries its inner boundaries
    assert [g[0] for g in groups] == [
        KeyRange(None, ("40",)),
        KeyRange(("40",), ("80",)),
        KeyRange(("80",), None),
    ]
    assert [g[1] for g in groups] == [[("10",), ("20",), ("30",)], [("50",), ("60",), ("70",)], [("90",)]]


def test_no_boundaries_is_one_chunk_of_one_slice() -> None:
    assert group_slices([], 10) == [(KeyRange(None, None), [])]


def test_slices_per_chunk_follow_the_settings_and_never_exceed_the_chunk() -> None:
    assert slices_per_chunk(Validation(chunk_rows=100_000, slice_rows=10_000)) == 10
    assert slices_per_chunk(Validation(chunk_rows=1_000, slice_rows=10_000)) == 1  # a slice is at most a chunk


def test_chunk_slices_reassemble_the_chunk_range() -> None:
    # Given a chunk planned from boundaries
    spec = table_spec(ORDERS, info(), info(), RowHash.FAST)
    chunks = chunk_specs(spec, [(str(b),) for b in range(1, 8)], Validation(chunk_rows=400, slice_rows=100))
    # When each chunk's slices are listed
    for chunk in chunks:
        slices = chunk.slice_ranges()
        # Then they run from the chunk's lower to its upper bound, each starting where the last ended
        assert slices[0].lower == chunk.range.key_range().lower
        assert slices[-1].upper == chunk.range.key_range().upper
        assert all(a.upper == b.lower for a, b in itertools.pairwise(slices))
    assert [len(c.slice_ranges()) for c in chunks] == [4, 4]
    assert (chunks[0].number, chunks[1].number, chunks[0].chunks) == (0, 1, 2)


# --- JSON, as Step Functions carries it --------------------------------------------------------


def test_plan_chunk_and_result_survive_a_json_round_trip() -> None:
    # Given a plan with a live-replication chunk whose keys are composite text
    spec = TableSpec(
        schema_name="sales",
        name="Line Items",
        key=["order_id", "sku"],
        key_types=["bigint", "text"],
        columns=[],
        row_hash=RowHash.MD5,
    )
    chunk = ChunkSpec(
        table=spec,
        number=3,
        chunks=9,
        range=RangeSpec.of(KeyRange(("10", "a\tb"), None)),
        slices=[["12", "é"]],
        replication=Replication(subscription="zdm_x", slot="zdm_x"),
    )
    plan = ValidationPlan(started_at=1.5, tables=[spec], chunks=[chunk])
    result = ChunkResult(table="sales.Line Items", chunk=3, chunks=9, first_lsn="0/16B3748")

    # When each goes through JSON text and back
    def through_json(model: ValidationPlan | ChunkSpec | ChunkResult) -> object:
        return json.loads(json.dumps(model.model_dump(mode="json")))

    plan_again = ValidationPlan.model_validate(through_json(plan))
    chunk_again = ChunkSpec.model_validate(through_json(chunk))
    result_again = ChunkResult.model_validate(through_json(result))
    # Then nothing is lost
    assert (plan_again, chunk_again, result_again) == (plan, chunk, result)
    assert chunk_again.slice_ranges() == [KeyRange(("10", "a\tb"), ("12", "é")), KeyRange(("12", "é"), None)]


def test_unknown_fields_in_a_chunk_are_refused() -> None:
    with pytest.raises(ValueError, match="extra"):
        ChunkSpec.model_validate({"table": {"schema_name": "a", "name": "b"}, "number": 0, "chunks": 1, "bogus": 1})


# --- one scan in key buckets: a key in no physical order ---------------------------------------------


def keyed_by(*key_types: str, multiset: bool = False) -> TableSpec:
    key = [] if multiset else [f"k{i}" for i in range(len(key_types))]
    return TableSpec(
        schema_name="public",
        name="r",
        key=key,
        key_types=[] if multiset else list(key_types),
        columns=[],
        row_hash=RowHash.FAST,
    )


@pytest.mark.parametrize(
    ("spec", "correlation", "rows", "bits"),
    [
        (keyed_by("uuid"), 0.01, 10_000_000, BUCKET_BITS),  # random uuids
        (keyed_by("uuid"), -0.3, 1_000, BUCKET_BITS),
        (keyed_by("uuid"), 0.98, 10_000_000, None),  # time-ordered uuids (v7) or a table filled in key order
        (keyed_by("uuid"), -0.9, 10_000_000, None),
        (keyed_by("uuid"), None, 10_000_000, None),  # never analyzed: key ranges are right for any order
        # a bucket holds about MAX_ROWS / 1,024 rows: one more bit per doubling, up to 16 bits
        (keyed_by("uuid"), 0.0, MAX_ROWS, BUCKET_BITS),
        (keyed_by("uuid"), 0.0, MAX_ROWS + 1, BUCKET_BITS + 1),
        (keyed_by("bigint"), 0.1, 3 * MAX_ROWS, BUCKET_BITS + 2),
        (keyed_by("text"), 0.0, 64 * MAX_ROWS, MAX_BUCKET_BITS),
        (keyed_by("uuid"), 0.0, 64 * MAX_ROWS + 1, None),  # then key ranges over many tasks
        (keyed_by("bigint"), 0.0, 10_000_000, BUCKET_BITS),  # random integers
        (keyed_by("smallint"), 0.2, 10_000, BUCKET_BITS),
        (keyed_by("bigint"), 1.0, 10_000_000, None),  # a serial key
        (keyed_by("text"), 0.0, 10_000_000, BUCKET_BITS),  # hashes, e-mail addresses: buckets of a hash
        (keyed_by("text"), 0.9, 10_000_000, None),
        (keyed_by("integer", "uuid"), 0.0, 10_000_000, BUCKET_BITS),  # (tenant, uuid): the first column's order
        (keyed_by("text", "bigint"), -0.7, 10_000_000, None),
        (keyed_by("uuid", multiset=True), 0.0, 10_000_000, None),  # no key
    ],
)
def test_a_key_in_no_physical_order_is_compared_by_scans_in_buckets_of_about_max_rows_over_1024(
    spec: TableSpec, correlation: float | None, rows: int, bits: int | None
) -> None:
    shape = bucket_scan_shape(spec, correlation, rows, MAX_ROWS, max_parallel_chunks=8)
    assert (shape.bits if shape else None) == bits


@pytest.mark.parametrize(
    ("rows", "parallel", "shape"),
    [
        # up to 8 processes a side scan for one task: one task until 8 x MAX_ROWS rows
        (8 * MAX_ROWS, 8, BucketScan(BUCKET_BITS + 3, 1)),
        (8 * MAX_ROWS + 1, 8, BucketScan(BUCKET_BITS + 4, 2)),
        (10 * MAX_ROWS, 32, BucketScan(BUCKET_BITS + 4, 2)),  # never more than 8 processes for one task
        (64 * MAX_ROWS, 8, BucketScan(MAX_BUCKET_BITS, 8)),
        # fewer processes a side: groups sooner, each of at least 1,024 buckets
        (2 * MAX_ROWS, 2, BucketScan(BUCKET_BITS + 1, 1)),
        (3 * MAX_ROWS, 2, BucketScan(BUCKET_BITS + 2, 2)),
        (5 * MAX_ROWS, 1, BucketScan(BUCKET_BITS + 3, 8)),
        (MAX_ROWS + 1, 1, BucketScan(BUCKET_BITS + 1, 2)),
    ],
)
def test_a_table_is_split_in_groups_only_past_what_one_task_s_scan_processes_hash(
    rows: int, parallel: int, shape: BucketScan
) -> None:
    # Given a table in no key order of `rows` rows, and `parallel` scan processes a side
    # When its scan is shaped
    # Then one task takes the table while its processes (up to 8) hash at most MAX_ROWS rows each:
    # every further group scans the whole table again
    assert bucket_scan_shape(keyed_by("uuid"), 0.0, rows, MAX_ROWS, max_parallel_chunks=parallel) == shape


def test_a_table_compared_by_one_scan_is_one_chunk_over_its_whole_key() -> None:
    settings = Validation(chunk_rows=1_000, slice_rows=100, max_parallel_chunks=3)
    chunks = chunk_specs(keyed_by("uuid"), [("4",), ("8",)], settings, bucket_scan=BucketScan(10, 1))
    assert [(c.chunks, c.bucket_bits, c.scan_workers, c.slices) for c in chunks] == [(1, 10, 3, [])]
    assert chunks[0].range.key_range() == KeyRange(None, None)


@pytest.mark.parametrize(("parallel", "workers"), [(1, 1), (2, 1), (3, 1), (8, 2), (32, 8)])
def test_a_table_too_large_for_one_scan_is_one_chunk_per_group_of_buckets(parallel: int, workers: int) -> None:
    # Given a table in 4,096 buckets (4 groups of 1,024)
    settings = Validation(chunk_rows=1_000, slice_rows=100, max_parallel_chunks=parallel)
    # When its chunks are planned
    chunks = chunk_specs(keyed_by("uuid"), [], settings, bucket_scan=BucketScan(BUCKET_BITS + 2, 4))
    # Then each group is one chunk over the whole key, and the chunks running at once share the scan
    # processes a side (at most max_parallel_chunks in all, and never none)
    assert [(c.number, c.chunks, c.bucket_group, c.bucket_groups) for c in chunks] == [(g, 4, g, 4) for g in range(4)]
    assert {(c.bucket_bits, c.scan_workers, c.range.key_range()) for c in chunks} == {
        (BUCKET_BITS + 2, workers, KeyRange(None, None))
    }


@pytest.mark.parametrize(("bits", "groups", "group"), [(12, 3, 0), (12, 4, 4), (None, 2, 0), (10, 1, 1)])
def test_a_bucket_group_outside_its_groups_is_refused(bits: int | None, groups: int, group: int) -> None:
    with pytest.raises(ValueError, match="bucket_group"):
        ChunkSpec(
            table=keyed_by("uuid"), number=0, chunks=1, bucket_bits=bits, bucket_groups=groups, bucket_group=group
        )
