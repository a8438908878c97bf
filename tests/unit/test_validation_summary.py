"""Chunk results merged into the summary (no database)."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Iterator

from lambdas.core.validation.model import ChunkResult, DiffList, KeyDiff, RowHash, TableSpec, ValidationPlan
from lambdas.core.validation.summary import MAX_NOTES, FirstInOrder, summarize


def spec(name: str, *, key: bool = True, comparable: bool = True, problems: list[str] | None = None) -> TableSpec:
    return TableSpec(
        schema_name="public",
        name=name,
        key=["id"] if key else [],
        key_types=["bigint"] if key else [],
        row_hash=RowHash.FAST,
        comparable=comparable,
        problems=problems or [],
    )


def keys(*values: str, columns: list[str] | None = None) -> DiffList:
    return DiffList(count=len(values), first=[KeyDiff(key=[v], columns=columns or []) for v in values])


def test_first_keys_come_in_chunk_order_and_counts_add_up() -> None:
    merged: FirstInOrder[KeyDiff] = FirstInOrder(3)
    for chunk, diff_list in enumerate([keys("1", "2"), keys("3"), keys("4", "5")]):
        merged.add(chunk, diff_list.first, diff_list.count)
    assert merged.count == 5
    assert [k.key for k in merged.items] == [["1"], ["2"], ["3"]]


def test_first_items_in_chunk_order_whatever_order_the_chunks_arrive_in() -> None:
    # Given 200 chunks' lists of 0 to 5 items (item = (chunk, position)), arriving in a random order
    rng = random.Random(3)
    lists = {chunk: [(chunk, i) for i in range(rng.randint(0, 5))] for chunk in range(200)}
    for first in (0, 1, 7, 50, 10_000):
        arrival = list(lists)
        rng.shuffle(arrival)
        folded: FirstInOrder[tuple[int, int]] = FirstInOrder(first)
        for chunk in arrival:
            folded.add(chunk, lists[chunk])
        # Then the same first items as in chunk order, and every item counted
        in_order = [item for chunk in sorted(lists) for item in lists[chunk]]
        assert folded.items == in_order[:first]
        assert folded.count == len(in_order)


def test_results_streamed_in_are_summarized_in_bounded_memory() -> None:
    # Given 400 chunk results of 250 changed keys each, produced one at a time (as read from the store)
    plan = ValidationPlan(started_at=0.0, tables=[spec("a")], first_keys=100)

    def results() -> Iterator[ChunkResult]:
        for chunk in range(400):
            first = [KeyDiff.model_construct(key=[f"{chunk}-{i}"], columns=["v"]) for i in range(250)]
            yield ChunkResult.model_construct(
                table="public.a",
                chunk=chunk,
                chunks=400,
                source_rows=250,
                changed=DiffList(count=250, first=first),
                notes=[f"note of chunk {chunk}"],
            )

    # When summarized
    tracemalloc.start()
    try:
        summary = summarize(plan, results(), finished_at=1.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then all 100,000 are counted, the first 100 in order are listed, and memory held a few chunks' worth
    table = summary.per_table[0]
    assert table.changed.count == 100_000 and len(table.changed.first) == 100
    assert [k.key[0] for k in table.changed.first[:2]] == ["0-0", "0-1"]
    assert table.changed.first[-1].key == ["0-99"]
    assert len(table.notes) == MAX_NOTES + 1 and table.notes[-1] == "... and 300 more note(s)"
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # all results at once: over 60 MiB


def test_identical_data_summarizes_as_ok_with_rates() -> None:
    # Given two clean chunks of 1,000 rows taking 0.5 s each, in a run of 2 s
    plan = ValidationPlan(started_at=100.0, tables=[spec("a")])
    results = [
        ChunkResult(table="public.a", chunk=i, chunks=2, source_rows=1000, target_rows=1000, seconds=0.5)
        for i in range(2)
    ]
    # When summarized
    summary = summarize(plan, results, finished_at=102.0)
    # Then everything is ok, with rows, chunks, duration and rows per second
    assert summary.ok
    assert (summary.rows_compared, summary.chunks, summary.differences, summary.seconds) == (2000, 2, 0, 2.0)
    assert summary.rows_per_second == 1000.0
    table = summary.per_table[0]
    assert (table.seconds, table.rows_per_second, table.chunks_planned) == (1.0, 2000.0, 2)


def test_differences_by_kind_with_first_keys_and_changed_columns() -> None:
    # Given chunks that found one of each kind, and a transient one
    plan = ValidationPlan(started_at=0.0, first_keys=2, tables=[spec("a")])
    results = [
        ChunkResult(
            table="public.a",
            chunk=1,
            chunks=2,
            missing=keys("20"),
            changed=keys("21", columns=["note"]),
            changed_columns={"note": 1},
            transient=1,
            slices_mismatched=1,
        ),
        ChunkResult(
            table="public.a",
            chunk=0,
            chunks=2,
            extra=keys("3"),
            changed=keys("4", "5", columns=["name", "note"]),
            changed_columns={"name": 2, "note": 2},
            slices_mismatched=2,
        ),
    ]
    # When summarized
    summary = summarize(plan, results, finished_at=1.0)
    table = summary.per_table[0]
    # Then counts per kind, the first keys in key (chunk) order, the columns tallied
    assert not summary.ok and not table.ok
    assert (summary.missing, summary.extra, summary.changed, summary.differences) == (1, 1, 3, 5)
    assert [k.key for k in table.changed.first] == [["4"], ["5"]]
    assert table.changed_columns == {"name": 2, "note": 3}
    assert (summary.transient, table.chunks_mismatched) == (1, 2)


def test_transient_differences_alone_are_ok_but_unsettled_ones_are_not() -> None:
    plan = ValidationPlan(started_at=0.0, tables=[spec("a")])
    transient = summarize(plan, [ChunkResult(table="public.a", chunk=0, transient=7)], finished_at=1.0)
    assert transient.ok and transient.transient == 7
    unsettled = summarize(plan, [ChunkResult(table="public.a", chunk=0, unsettled=keys("9"))], finished_at=1.0)
    assert not unsettled.ok and unsettled.unsettled == 1 and unsettled.differences == 0


def test_a_missing_chunk_result_fails_the_table() -> None:
    # Given three planned chunks and only two results (a task failed)
    plan = ValidationPlan(started_at=0.0, tables=[spec("a")])
    results = [ChunkResult(table="public.a", chunk=i, chunks=3) for i in (0, 2)]
    summary = summarize(plan, results, finished_at=1.0)
    # Then the table is not ok and says so
    assert not summary.ok and summary.chunks_missing == 1
    assert summary.per_table[0].problems == ["1 of 3 chunk(s) have no result (a task failed); their rows are unchecked"]


def test_a_duplicate_result_from_a_retried_task_counts_once() -> None:
    plan = ValidationPlan(started_at=0.0, tables=[spec("a")])
    result = ChunkResult(table="public.a", chunk=0, source_rows=10, missing=keys("1"))
    summary = summarize(plan, [result, result], finished_at=1.0)
    assert (summary.rows_compared, summary.missing) == (10, 1)


def test_schema_problems_and_uncompared_tables_fail_the_summary() -> None:
    plan = ValidationPlan(
        started_at=0.0,
        tables=[
            spec("gone", comparable=False, problems=["missing on the target"]),
            spec("extra_col", problems=["columns only on the target (not compared): ['flag']"]),
            spec("bag", key=False),
        ],
    )
    results = [
        ChunkResult(table="public.extra_col", chunk=0, source_rows=5),
        ChunkResult(table="public.bag", chunk=0, multiset=True, source_rows=3),
    ]
    summary = summarize(plan, results, finished_at=1.0)
    by_name = {t.table: t for t in summary.per_table}
    assert not summary.ok and summary.problems == 2
    assert not by_name["public.gone"].compared and not by_name["public.gone"].ok
    assert not by_name["public.extra_col"].ok
    assert by_name["public.bag"].ok and by_name["public.bag"].multiset
    json.dumps(summary.model_dump(mode="json"))
