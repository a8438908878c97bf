"""The validation store on S3 (moto): a plan's chunks stored for the Distributed Map's ItemReader,
each chunk's result stored beside them, the summary read back from the store."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from lambdas.core.validation.model import ChunkResult, ChunkSpec, DiffList, KeyDiff, RowHash, TableSpec, ValidationPlan
from lambdas.core.validation.store import plan_prefix
from lambdas.core.validation.store_s3 import S3ValidationStore
from lambdas.core.validation.summary import summarize

BUCKET = "zdm-test-validation"


@pytest.fixture
def store() -> Iterator[S3ValidationStore]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield S3ValidationStore(client, BUCKET)


def table(name: str) -> TableSpec:
    return TableSpec(schema_name="public", name=name, key=["id"], key_types=["bigint"], row_hash=RowHash.FAST)


def plan_of(chunks_per_table: dict[str, int]) -> ValidationPlan:
    tables = [table(n) for n in chunks_per_table]
    chunks = [
        ChunkSpec(table=t, number=i, chunks=chunks_per_table[t.name])
        for t in tables
        for i in range(chunks_per_table[t.name])
    ]
    return ValidationPlan(started_at=0.0, tables=tables, chunks=chunks)


def test_a_stored_plan_carries_where_its_chunks_are_not_the_chunks(store: S3ValidationStore) -> None:
    # Given a plan of 3 + 2 chunks
    plan = plan_of({"a": 3, "b": 2})
    # When its chunks are stored for an execution
    stored = store.store_chunks(plan, "exec-1")
    # Then the plan that travels on holds the location and the counts, and the object holds the chunks
    assert stored.chunks == [] and stored.items is not None
    assert stored.chunks_per_table == {"public.a": 3, "public.b": 2} and stored.items.chunks == 5
    assert stored.items.key.startswith("validation/exec-1/") and stored.items.key.endswith("/chunks.json")
    assert store.load_chunks(stored.items) == plan.chunks
    # And the object is the JSON array the Map's ItemReader (InputType JSON) reads: one item per chunk
    items = json.loads(store.get_object(stored.items.key))
    assert [ChunkSpec.model_validate(i) for i in items] == plan.chunks
    # And the whole plan passed between states stays small whatever the chunk count
    assert len(json.dumps(stored.model_dump(mode="json"))) < 4000


def test_each_plan_gets_a_prefix_of_its_own() -> None:
    # A plan made again in the same execution (a retried task) never meets the earlier plan's results
    assert plan_prefix("exec-1") != plan_prefix("exec-1")
    assert plan_prefix("exec 1/../x", "p") == "validation/exec_1_.._x/p/"


def test_results_stored_per_chunk_summarize_like_results_passed_in(store: S3ValidationStore) -> None:
    # Given a stored plan of 3 chunks, and the results of its chunk tasks, one stored twice (a retry)
    stored = store.store_chunks(plan_of({"a": 3}), "exec-2")
    assert stored.items is not None
    results = [
        ChunkResult(table="public.a", chunk=0, chunks=3, source_rows=10, target_rows=10),
        ChunkResult(
            table="public.a",
            chunk=1,
            chunks=3,
            source_rows=10,
            target_rows=9,
            missing=DiffList(count=1, first=[KeyDiff(key=["7"])]),
        ),
        ChunkResult(table="public.a", chunk=2, chunks=3, source_rows=10, target_rows=10),
    ]
    for result in [*results, results[1]]:
        store.store_result(stored.items, result)
    # When the summary reads them back
    loaded = list(store.iter_results(stored.items))
    summary = summarize(stored, iter(loaded), finished_at=1.0)
    # Then it is the summary of the results themselves: one object per chunk, the missing row named
    assert len(loaded) == 3
    assert summary == summarize(plan_of({"a": 3}), results, finished_at=1.0)
    assert summary.missing == 1 and summary.per_table[0].missing.first[0].key == ["7"]


def test_a_chunk_without_a_stored_result_fails_the_summary(store: S3ValidationStore) -> None:
    # Given a stored plan of 2 chunks for table a and 1 for table b, and only a's first result stored
    stored = store.store_chunks(plan_of({"a": 2, "b": 1}), "exec-3")
    assert stored.items is not None
    store.store_result(stored.items, ChunkResult(table="public.a", chunk=0, chunks=2, source_rows=5, target_rows=5))
    # When summarized from the store
    summary = summarize(stored, store.iter_results(stored.items), finished_at=1.0)
    # Then both gaps are counted, table b's too although no result of it came back at all
    assert not summary.ok and summary.chunks_missing == 2
    by_name = {t.table: t for t in summary.per_table}
    assert by_name["public.b"].problems == ["1 of 1 chunk(s) have no result (a task failed); their rows are unchecked"]


def namesakes() -> tuple[TableSpec, TableSpec]:
    """public."a.b" and "public.a".b: the same text as `schema.name`."""
    specs = (
        TableSpec(schema_name="public", name="a.b", key=["id"], key_types=["bigint"], row_hash=RowHash.FAST),
        TableSpec(schema_name="public.a", name="b", key=["id"], key_types=["bigint"], row_hash=RowHash.FAST),
    )
    assert [s.label for s in specs] == ['public."a.b"', '"public.a".b']
    return specs


def test_a_namesake_missing_on_the_target_keeps_its_own_problem(store: S3ValidationStore) -> None:
    # Given public."a.b" missing on the target and "public.a".b compared in one chunk
    missing, other = namesakes()
    missing = missing.model_copy(update={"comparable": False, "problems": ["missing on the target"]})
    plan = ValidationPlan(started_at=0.0, tables=[missing, other], chunks=[ChunkSpec(table=other, number=0, chunks=1)])
    stored = store.store_chunks(plan, "exec")
    assert stored.items is not None
    store.store_result(stored.items, ChunkResult(table=other.label, chunk=0, chunks=1, source_rows=10, target_rows=10))
    # When summarized / Then both tables are there and the validation fails (once: one table, ok)
    summary = summarize(stored, store.iter_results(stored.items), finished_at=1.0)
    assert summary.tables == 2 and not summary.ok


def test_results_of_two_namesakes_do_not_overwrite_each_other(store: S3ValidationStore) -> None:
    # Given one chunk of each namesake, one with a changed row
    x, y = namesakes()
    chunks = [ChunkSpec(table=x, number=0, chunks=1), ChunkSpec(table=y, number=0, chunks=1)]
    stored = store.store_chunks(ValidationPlan(started_at=0.0, tables=[x, y], chunks=chunks), "exec")
    assert stored.items is not None
    store.store_result(stored.items, ChunkResult(table=x.label, chunk=0, chunks=1, source_rows=10, target_rows=10))
    changed = DiffList(count=1, first=[KeyDiff(key=["1"], columns=["v"])])
    store.store_result(
        stored.items, ChunkResult(table=y.label, chunk=0, chunks=1, source_rows=10, target_rows=10, changed=changed)
    )
    # When summarized / Then each kept its result (once: one overwrote the other, a chunk counted missing)
    summary = summarize(stored, store.iter_results(stored.items), finished_at=1.0)
    assert summary.changed == 1 and summary.chunks_missing == 0
