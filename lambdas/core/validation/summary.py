"""Chunk results merged into a summary per table and overall (no database)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from lambdas.core.validation.model import (
    ChunkResult,
    DiffList,
    KeyDiff,
    TableSpec,
    TableSummary,
    ValidationPlan,
    ValidationSummary,
)


def merge_lists(lists: Iterable[DiffList], first: int) -> DiffList:
    """Counts added up; the first `first` entries kept in the order given (chunk order is key order)."""
    count = 0
    entries: list[KeyDiff] = []
    for diff_list in lists:
        count += diff_list.count
        room = first - len(entries)
        if room > 0:
            entries += diff_list.first[:room]
    return DiffList(count=count, first=entries)


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


def summarize_table(
    spec: TableSpec, results: Sequence[ChunkResult], *, planned_chunks: int | None, first: int
) -> TableSummary:
    name = str(spec.table)
    if not spec.comparable:
        return TableSummary(table=name, multiset=spec.multiset, compared=False, problems=list(spec.problems), ok=False)
    unique = {r.chunk: r for r in results}  # a retried task may report a chunk twice: keep one
    ordered = [unique[n] for n in sorted(unique)]
    expected = planned_chunks if planned_chunks is not None else max((r.chunks for r in ordered), default=1)
    problems = list(spec.problems)
    absent = expected - len(ordered)
    if absent > 0:
        problems.append(f"{absent} of {expected} chunk(s) have no result (a task failed); their rows are unchecked")
    changed_columns: Counter[str] = Counter()
    for result in ordered:
        changed_columns.update(result.changed_columns)
    seconds = sum(r.seconds for r in ordered)
    source_rows = sum(r.source_rows for r in ordered)
    summary = TableSummary(
        table=name,
        multiset=spec.multiset,
        source_rows=source_rows,
        target_rows=sum(r.target_rows for r in ordered),
        chunks=len(ordered),
        chunks_planned=max(expected, len(ordered)),
        chunks_mismatched=sum(1 for r in ordered if r.slices_mismatched),
        missing=merge_lists((r.missing for r in ordered), first),
        extra=merge_lists((r.extra for r in ordered), first),
        changed=merge_lists((r.changed for r in ordered), first),
        unsettled=merge_lists((r.unsettled for r in ordered), first),
        transient=sum(r.transient for r in ordered),
        changed_columns=dict(sorted(changed_columns.items())),
        problems=problems,
        notes=[note for r in ordered for note in r.notes],
        seconds=round(seconds, 6),
        rows_per_second=_rate(source_rows, seconds),
    )
    ok = not problems and summary.differences == 0 and summary.unsettled.count == 0
    return summary.model_copy(update={"ok": ok})


def summarize(plan: ValidationPlan, results: Sequence[ChunkResult], *, finished_at: float) -> ValidationSummary:
    """One summary from every chunk's result. `plan.chunks` may be left out (only its count per table is
    used; a stored plan keeps the counts in `chunks_per_table`)."""
    by_table: dict[str, list[ChunkResult]] = {}
    for result in results:
        by_table.setdefault(result.table, []).append(result)
    planned: Counter[str] = Counter(str(c.table.table) for c in plan.chunks) + Counter(plan.chunks_per_table)
    known = bool(plan.chunks) or plan.items is not None  # else: only the results say how many to expect
    tables = [
        summarize_table(
            spec,
            by_table.get(str(spec.table), []),
            planned_chunks=planned.get(str(spec.table), 0) if known else None,
            first=plan.first_keys,
        )
        for spec in plan.tables
    ]
    seconds = max(0.0, finished_at - plan.started_at)
    rows = sum(t.source_rows for t in tables)
    missing_chunks = sum(t.chunks_planned - t.chunks for t in tables if t.compared)
    return ValidationSummary(
        ok=all(t.ok for t in tables),
        rows_compared=rows,
        target_rows=sum(t.target_rows for t in tables),
        tables=len(tables),
        chunks=sum(t.chunks for t in tables),
        chunks_missing=missing_chunks,
        differences=sum(t.differences for t in tables),
        missing=sum(t.missing.count for t in tables),
        extra=sum(t.extra.count for t in tables),
        changed=sum(t.changed.count for t in tables),
        unsettled=sum(t.unsettled.count for t in tables),
        transient=sum(t.transient for t in tables),
        problems=sum(len(t.problems) for t in tables),
        seconds=round(seconds, 6),
        rows_per_second=_rate(rows, seconds),
        per_table=tables,
    )
