"""Chunk results folded into a summary per table and overall (no database).

Results are folded one at a time, in any order, keeping only what the summary shows: sums, the
chunk numbers seen, and per list the first `first` entries in chunk order. So a plan of a
million chunks is summarized in the memory of a few, as its results stream in from the store.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lambdas.core.validation.model import (
    ChunkResult,
    DiffList,
    KeyDiff,
    TableSpec,
    TableSummary,
    ValidationPlan,
    ValidationSummary,
)

T = TypeVar("T")
MAX_NOTES = 100  # per table; the count of the others is noted


@dataclass
class FirstInOrder(Generic[T]):
    """The first `first` items, in chunk order, of per-chunk lists arriving in any order.

    Items past the first `first` of those kept can never come back into the first `first`
    (later lists only add items), so they are dropped at once: memory stays bounded by `first`.
    """

    first: int
    count: int = 0
    _kept: list[tuple[int, list[T]]] = field(default_factory=list)  # (chunk, items), by chunk
    _size: int = 0

    def add(self, chunk: int, items: list[T], count: int | None = None) -> None:
        self.count += len(items) if count is None else count
        items = items[: self.first]
        if not items:
            return
        position = bisect.bisect_right([c for c, _ in self._kept], chunk)
        self._kept.insert(position, (chunk, list(items)))
        self._size += len(items)
        while self._size > self.first:
            last_chunk, last = self._kept[-1]
            excess = self._size - self.first
            if excess >= len(last):
                self._kept.pop()
                self._size -= len(last)
            else:
                self._kept[-1] = (last_chunk, last[: len(last) - excess])
                self._size -= excess

    @property
    def items(self) -> list[T]:
        return [item for _, items in self._kept for item in items]


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1) if seconds > 0 else 0.0


_LISTS = ("missing", "extra", "changed", "unsettled")


class TableTally:
    """One table's results folded as they come (a chunk reported twice, by a retried task, counts once)."""

    def __init__(self, spec: TableSpec, first: int) -> None:
        self.spec = spec
        self.chunks_seen: set[int] = set()
        self.chunks_declared = 0  # the most chunks any result said its table has
        self.source_rows = self.target_rows = self.transient = self.chunks_mismatched = 0
        self.seconds = 0.0
        self.changed_columns: Counter[str] = Counter()
        self.lists = {name: FirstInOrder[KeyDiff](first) for name in _LISTS}
        self.notes: FirstInOrder[str] = FirstInOrder(MAX_NOTES)

    def add(self, result: ChunkResult) -> None:
        if result.chunk in self.chunks_seen:
            return
        self.chunks_seen.add(result.chunk)
        self.chunks_declared = max(self.chunks_declared, result.chunks)
        self.source_rows += result.source_rows
        self.target_rows += result.target_rows
        self.transient += result.transient
        self.chunks_mismatched += 1 if result.slices_mismatched else 0
        self.seconds += result.seconds
        self.changed_columns.update(result.changed_columns)
        for name in _LISTS:
            diff_list: DiffList = getattr(result, name)
            self.lists[name].add(result.chunk, diff_list.first, diff_list.count)
        self.notes.add(result.chunk, result.notes)

    def _listed(self, name: str) -> DiffList:
        return DiffList(count=self.lists[name].count, first=self.lists[name].items)

    def summary(self, planned_chunks: int | None) -> TableSummary:
        spec = self.spec
        name = spec.label
        if not spec.comparable:
            return TableSummary(
                table=name, multiset=spec.multiset, compared=False, problems=list(spec.problems), ok=False
            )
        chunks = len(self.chunks_seen)
        expected = planned_chunks if planned_chunks is not None else max(self.chunks_declared, 1)
        problems = list(spec.problems)
        absent = expected - chunks
        if absent > 0:
            problems.append(f"{absent} of {expected} chunk(s) have no result (a task failed); their rows are unchecked")
        notes = [*spec.notes, *self.notes.items]
        if self.notes.count > len(self.notes.items):
            notes.append(f"... and {self.notes.count - len(self.notes.items):,} more note(s)")
        summary = TableSummary(
            table=name,
            multiset=spec.multiset,
            source_rows=self.source_rows,
            target_rows=self.target_rows,
            chunks=chunks,
            chunks_planned=max(expected, chunks),
            chunks_mismatched=self.chunks_mismatched,
            transient=self.transient,
            changed_columns=dict(sorted(self.changed_columns.items())),
            problems=problems,
            notes=notes,
            seconds=round(self.seconds, 6),
            rows_per_second=_rate(self.source_rows, self.seconds),
            missing=self._listed("missing"),
            extra=self._listed("extra"),
            changed=self._listed("changed"),
            unsettled=self._listed("unsettled"),
        )
        ok = not problems and summary.differences == 0 and summary.unsettled.count == 0
        return summary.model_copy(update={"ok": ok})


def summarize(plan: ValidationPlan, results: Iterable[ChunkResult], *, finished_at: float) -> ValidationSummary:
    """One summary from every chunk's result, read once (an iterator streaming from the store will
    do). `plan.chunks` may be left out (only its count per table is used; a stored plan keeps the
    counts in `chunks_per_table`). Results of tables the plan does not hold are ignored."""
    tallies = {spec.label: TableTally(spec, plan.first_keys) for spec in plan.tables}
    for result in results:
        tally = tallies.get(result.table)
        if tally is not None:
            tally.add(result)
    planned: Counter[str] = Counter(c.table.label for c in plan.chunks) + Counter(plan.chunks_per_table)
    known = bool(plan.chunks) or plan.items is not None  # else: only the results say how many to expect
    tables = [tally.summary(planned.get(name, 0) if known else None) for name, tally in tallies.items()]
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
