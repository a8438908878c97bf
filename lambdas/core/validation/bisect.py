"""Decisions about compared key ranges, without a database.

A chunk is cut into many small key ranges (of about `AdaptivePolicy.range_rows` rows each), and
every range's aggregate (row count and the exact sum of a 64-bit hash of every row's text form)
is computed on each side in one statement, each row hashed once. Equal aggregates: the range is
equal (a changed row shifts the sum unless two 64-bit hash differences cancel exactly).
Different: if the range holds few enough rows, its (key, hash) pairs are fetched from both sides
and diffed; otherwise (far more rows than planned, e.g. rows only the target has) it is split at
key quantiles of the side holding more rows and each part is compared again.

The range size trades the cost of one more range per statement against the rows re-read around
each difference: large ranges when differences are rare, small ones when they are dense.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import overload

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


@dataclass(frozen=True)
class EvenRanges(Sequence[KeyRange]):
    """`outer` cut into `parts` ranges at equal widths of a single integer key:
    [outer.lower, low + width), [low + width, low + 2 width), ..., [low + (parts - 1) width, outer.upper).

    Kept as arithmetic (SQL computes each range's bounds), so a piece of a million rows cut into
    ranges of 16 costs no Python object per range.
    """

    outer: KeyRange
    low: int
    width: int
    parts: int

    def __len__(self) -> int:
        return self.parts

    @overload
    def __getitem__(self, index: int) -> KeyRange: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[KeyRange]: ...

    def __getitem__(self, index: int | slice) -> KeyRange | Sequence[KeyRange]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.parts))]
        if not -self.parts <= index < self.parts:
            raise IndexError(index)
        i = index % self.parts
        lower = self.outer.lower if i == 0 else (str(self.low + i * self.width),)
        upper = self.outer.upper if i == self.parts - 1 else (str(self.low + (i + 1) * self.width),)
        return KeyRange(lower, upper)


def even_ranges(outer: KeyRange, low: int, high: int, expected_rows: int, range_rows: int) -> EvenRanges:
    """`outer`, whose integer keys lie in low..high (inclusive) on both sides, cut at equal widths into
    ranges holding about `range_rows` of `expected_rows` rows each (if the keys are spread evenly)."""
    parts = max(1, math.ceil(max(1, expected_rows) / max(1, range_rows)))
    width = max(1, math.ceil((high - low + 1) / parts))
    return EvenRanges(outer, low, width, max(1, math.ceil((high - low + 1) / width)))


def ranges_between(key_range: KeyRange, cuts: Sequence[Bound]) -> list[KeyRange]:
    """`key_range` cut at `cuts` (sorted keys inside it; one equal to the lower bound is dropped)."""
    return split_range(key_range, cuts) or [key_range]


def mismatched_ranges(source: bytes, target: bytes) -> list[tuple[int, Aggregate, Aggregate]]:
    """The positions (and both aggregates) of the ranges whose `count sum` lines differ.

    Both texts hold one line per range, in the same order (`queries.range_aggregates`).
    """
    if source == target:
        return []
    src, tgt = source.split(b"\n"), target.split(b"\n")
    if len(src) != len(tgt):
        raise ValueError(f"range aggregates: {len(src)} lines on the source, {len(tgt)} on the target")
    return [(i, _aggregate(a), _aggregate(b)) for i, (a, b) in enumerate(zip(src, tgt, strict=True)) if a != b]


def _aggregate(line: bytes) -> Aggregate:
    rows, digest = line.split(b" ")
    return Aggregate(int(rows), digest.decode("ascii"))


# Costs per row of one side, in units of an aggregate's cost per row (hash + sum, the floor's work),
# measured on PostgreSQL 15, one 100,000-row statement per variant on the table `bench.validate` builds, jit off
# (timed one by one in a session, not by the bench itself; an aggregate: 0.41 us per row):
RANGE_COST = 5.6  # one more range in a statement (2.3 us: its index descent and aggregate)
RELINE_COST = 1.55  # re-reading a row of a mismatching range as a (key, hash) text line (0.64 us)
TEXT_LINES_COST = 1.55  # reading every row as a text line instead of aggregates (`queries.range_lines`)
RECORD_LINES_COST = 1.18  # ... as a binary record (`queries.range_records`; a bigint key, 2M rows)
RANGE_ROWS = tuple(2**i for i in range(3, 11))  # 8 .. 1024 rows per range
PRIOR_ROWS = 1_000  # before anything is seen, differences are taken as half a difference per this many rows


@dataclass
class AdaptivePolicy:
    """How to compare the next piece of a table, from how dense its differences have been so far.

    By ranges: a range costs `RANGE_COST` and a mismatching range re-reads its rows, so per row
    1 + RANGE_COST / size + RELINE_COST * P(range mismatches); with differences spread at random
    (density p), P = 1 - (1 - p)^size; the size in `RANGE_ROWS` with the least cost is chosen:
    about 1000 rows per range for clean data, 64 for one row in a thousand differing. Or, once
    differences are dense enough that this costs more (about 1 row in 1,000 for binary records),
    every row's (key, hash) line is read instead, with no aggregate at all (`every_line`).
    The density is estimated from what was seen, starting from half a difference per
    `PRIOR_ROWS` rows. One policy may be shared by the chunks of a table compared in one process
    (counts only ever grow).
    """

    slice_rows: int
    rows_seen: int = 0
    differences_seen: int = 0

    def record(self, rows: int, differences: int) -> None:
        self.rows_seen += rows
        self.differences_seen += differences

    @property
    def informed(self) -> bool:
        """Whether at least a slice's worth of rows was seen (before that, compare one slice at a time)."""
        return self.rows_seen >= self.slice_rows

    @property
    def density(self) -> float:
        return (self.differences_seen + 0.5) / (self.rows_seen + PRIOR_ROWS)

    def ranges_cost(self, size: int) -> float:
        """Cost per row of comparing by ranges of `size` rows (see the class docstring)."""
        p = min(1.0, self.density)
        return 1.0 + RANGE_COST / size + RELINE_COST * (1.0 - (1.0 - p) ** size)

    @property
    def range_rows(self) -> int:
        return int(min(RANGE_ROWS, key=self.ranges_cost))

    def every_line(self, lines_cost: float) -> bool:
        """Whether reading every row as a line (at `lines_cost` per row) beats the best range size;
        only once informed: a guess from the prior never turns aggregates off."""
        return self.informed and lines_cost < self.ranges_cost(self.range_rows)


def multiset_bits(rows: int, rows_per_bucket: int = 1000) -> int:
    """Hash bits that cut `rows` rows into buckets of about `rows_per_bucket` (1 to 16 bits)."""
    if rows <= rows_per_bucket:
        return 1
    return max(1, min(16, math.ceil(math.log2(rows / rows_per_bucket))))


def prefix_range(bucket: int, bits: int) -> KeyRange:
    """The uuid key range whose keys' leading `bits` bits are `bucket` (uuids order bytewise), open at the ends."""

    def bound(b: int) -> Bound | None:
        return None if b <= 0 or b >= 2**bits else (str(uuid.UUID(int=b << (128 - bits))),)

    return KeyRange(bound(bucket), bound(bucket + 1))


@dataclass(frozen=True)
class UuidPrefixes:
    """A uuid key's buckets: the leading `bits` bits of its keys, each bucket a key range (`prefix_range`)."""

    bits: int

    @property
    def count(self) -> int:
        return 1 << self.bits

    def range(self, bucket: int) -> KeyRange:
        return prefix_range(bucket, self.bits)


@dataclass(frozen=True)
class IntegerWidths:
    """An integer key's buckets: equal widths of its values (`EvenRanges`; the first open below, the last above)."""

    ranges: EvenRanges

    @property
    def count(self) -> int:
        return len(self.ranges)

    def range(self, bucket: int) -> KeyRange:
        return self.ranges[bucket]


@dataclass(frozen=True)
class KeyHashes:
    """Any key's buckets: the top `bits` bits of a 64-bit hash of its value (`queries.bucket_of`). A bucket
    is no key range, so its rows are only found by scanning (`queries.bucket_lines`)."""

    bits: int

    @property
    def count(self) -> int:
        return 1 << self.bits


KeyBuckets = UuidPrefixes | IntegerWidths | KeyHashes


def integer_widths(low: int, high: int, bits: int) -> IntegerWidths:
    """Keys from `low` to `high` (inclusive) in at most 2**bits buckets of equal width."""
    return IntegerWidths(even_ranges(KeyRange(None, None), low, high, 2**bits, 1))


def mismatched_buckets(source: dict[int, Aggregate], target: dict[int, Aggregate]) -> list[int]:
    """Buckets whose aggregates differ (a bucket only one side has counts as differing)."""
    empty = Aggregate(0, "0")
    return sorted(b for b in set(source) | set(target) if source.get(b, empty) != target.get(b, empty))
