"""Decisions about a compared key range, without a database.

A range is first compared by aggregate: row count and the exact sum of a 64-bit hash of every
row's text form, on each side. Equal aggregates: the range is equal (a changed row shifts the
sum unless two 64-bit hash differences cancel exactly). Different: if the range is small
enough, its (key, hash) pairs are fetched from both sides and diffed; otherwise it is split
into parts of about `slice_rows` rows at key quantiles and each part is compared again.

When differences are dense (every slice mismatches), comparing an aggregate first only doubles
the reads, so after a mismatching slice the next one is fetched directly; after a clean one,
aggregates resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from lambdas.core.ranges import Bound, KeyRange

MAX_PARTS = 64
MAX_DEPTH = 24


@dataclass(frozen=True)
class Aggregate:
    rows: int
    digest: str  # exact sum of the rows' 64-bit hashes, as text ('0' for no rows)


class Step(StrEnum):
    EQUAL = "equal"
    FETCH = "fetch"
    SPLIT = "split"


@dataclass(frozen=True)
class Decision:
    step: Step
    parts: int = 0


def fetch_limit(slice_rows: int) -> int:
    """The most rows (on either side) a mismatching range may hold to be fetched rather than split."""
    return 2 * max(1, slice_rows)


def decide(source: Aggregate, target: Aggregate, slice_rows: int, *, depth: int = 0) -> Decision:
    """What to do with a range whose aggregates were just compared."""
    if source == target:
        return Decision(Step.EQUAL)
    larger = max(source.rows, target.rows)
    if larger <= fetch_limit(slice_rows) or depth >= MAX_DEPTH:
        return Decision(Step.FETCH)
    return Decision(Step.SPLIT, min(MAX_PARTS, max(2, math.ceil(larger / max(1, slice_rows)))))


def quantile_step(rows: int, parts: int) -> int:
    """Every how many rows (in key order) a split boundary is taken."""
    return max(1, math.ceil(rows / max(1, parts)))


def split_range(key_range: KeyRange, boundaries: Sequence[Bound]) -> list[KeyRange]:
    """`key_range` cut at `boundaries` (sorted keys inside it); empty when there is nothing to cut at."""
    cuts = [b for b in boundaries if b != key_range.lower]
    if not cuts:
        return []
    points: list[Bound | None] = [key_range.lower, *cuts, key_range.upper]
    return [KeyRange(points[i], points[i + 1]) for i in range(len(points) - 1)]


FETCH_COST = 1.6  # a (key, hash) fetch of a range costs about this many aggregates of it
PRIOR_SLICES = 4  # the estimate starts as if this many clean slices had been seen


@dataclass
class AdaptivePolicy:
    """Whether to fetch a slice's (key, hash) pairs directly, skipping its aggregate.

    A clean slice costs one aggregate; a mismatching one an aggregate and a fetch. Fetching
    directly costs one fetch (about `FETCH_COST` aggregates), so it pays when the slice
    mismatches with a probability above (FETCH_COST - 1) / FETCH_COST. That probability is
    estimated from the differences per row seen so far (Poisson: 1 - e^-expected), starting
    from `PRIOR_SLICES` clean slices so that one early difference does not switch modes: a few
    scattered differences keep aggregates, dense ones switch to fetching. One policy may be
    shared by the chunks of a table compared in one process (counts only ever grow).
    """

    slice_rows: int
    rows_seen: int = 0
    differences_seen: int = 0

    def record(self, rows: int, differences: int) -> None:
        self.rows_seen += rows
        self.differences_seen += differences

    @property
    def mismatch_probability(self) -> float:
        if self.differences_seen == 0:
            return 0.0
        expected = self.differences_seen / (self.rows_seen + PRIOR_SLICES * self.slice_rows) * self.slice_rows
        return 1.0 - math.exp(-expected)

    @property
    def fetch_next(self) -> bool:
        return self.mismatch_probability > (FETCH_COST - 1.0) / FETCH_COST


def multiset_bits(rows: int, rows_per_bucket: int = 1000) -> int:
    """Hash bits that cut `rows` rows into buckets of about `rows_per_bucket` (1 to 16 bits)."""
    if rows <= rows_per_bucket:
        return 1
    return max(1, min(16, math.ceil(math.log2(rows / rows_per_bucket))))


def mismatched_buckets(source: dict[int, Aggregate], target: dict[int, Aggregate]) -> list[int]:
    """Buckets whose aggregates differ (a bucket only one side has counts as differing)."""
    empty = Aggregate(0, "0")
    return sorted(b for b in set(source) | set(target) if source.get(b, empty) != target.get(b, empty))
