"""Bisection decisions, range cutting and the range-size policy, without a database."""

from __future__ import annotations

import uuid

from lambdas.core.ranges import KeyRange
from lambdas.core.validation.bisect import (
    MAX_DEPTH,
    RECORD_LINES_COST,
    TEXT_LINES_COST,
    AdaptivePolicy,
    Aggregate,
    Decision,
    EvenRanges,
    Step,
    decide,
    even_ranges,
    fetch_limit,
    integer_widths,
    mismatched_buckets,
    mismatched_ranges,
    multiset_bits,
    prefix_range,
    quantile_step,
    ranges_between,
    split_range,
)


def test_equal_aggregates_mean_an_equal_range() -> None:
    assert decide(Aggregate(10_000, "123"), Aggregate(10_000, "123"), 10_000) == Decision(Step.EQUAL)


def test_same_count_different_sum_is_a_mismatch() -> None:
    # Given a changed row: the count agrees, the hash sum does not / Then the range is fetched
    assert decide(Aggregate(10_000, "123"), Aggregate(10_000, "124"), 10_000) == Decision(Step.FETCH)


def test_a_small_mismatching_range_is_fetched() -> None:
    # Given up to twice slice_rows on the larger side / Then fetch, do not split
    assert fetch_limit(10_000) == 20_000
    assert decide(Aggregate(20_000, "1"), Aggregate(0, "0"), 10_000) == Decision(Step.FETCH)


def test_a_large_mismatching_range_is_split_into_parts_of_about_slice_rows() -> None:
    # Given 95,000 rows on the target where the source has 40 (extra rows on the target)
    decision = decide(Aggregate(40, "1"), Aggregate(95_000, "2"), 10_000)
    # Then it is split in ten parts, sized from the side holding more rows
    assert decision == Decision(Step.SPLIT, 10)
    assert quantile_step(95_000, 10) == 9_500


def test_splits_are_bounded_in_fan_out_and_depth() -> None:
    assert decide(Aggregate(10**9, "1"), Aggregate(0, "0"), 100).parts == 64
    assert decide(Aggregate(10**9, "1"), Aggregate(0, "0"), 100, depth=MAX_DEPTH) == Decision(Step.FETCH)


def test_split_range_cuts_at_the_boundaries_and_keeps_the_outer_bounds() -> None:
    whole = KeyRange(("10",), ("90",))
    assert split_range(whole, [("30",), ("60",)]) == [
        KeyRange(("10",), ("30",)),
        KeyRange(("30",), ("60",)),
        KeyRange(("60",), ("90",)),
    ]


def test_split_range_drops_a_boundary_equal_to_the_lower_bound_and_gives_up_without_cuts() -> None:
    # Given the quantile query returned the range's first key as a boundary
    assert split_range(KeyRange(("10",), None), [("10",), ("50",)]) == [
        KeyRange(("10",), ("50",)),
        KeyRange(("50",), None),
    ]
    # And nothing to cut at / Then no split (the caller fetches instead)
    assert split_range(KeyRange(("10",), None), [("10",)]) == []


def test_integer_keys_are_cut_at_equal_widths_between_the_least_and_greatest_key() -> None:
    # Given keys 1..1000 expected to hold 100 rows, ranges of about 25 rows
    piece = KeyRange(None, ("2000",))
    ranges = even_ranges(piece, 1, 1000, 100, 25)
    # Then four ranges of width 250, the outer ones keeping the piece's bounds
    assert ranges == EvenRanges(piece, 1, 250, 4)
    assert list(ranges) == [
        KeyRange(None, ("251",)),
        KeyRange(("251",), ("501",)),
        KeyRange(("501",), ("751",)),
        KeyRange(("751",), ("2000",)),
    ]
    assert ranges[-1] == ranges[3] and ranges[1:3] == [ranges[1], ranges[2]]
    # And keys denser than the rows they should split: width 1 at least
    assert list(even_ranges(piece, 0, 3, 1000, 1)) == [
        KeyRange(None, ("1",)),
        KeyRange(("1",), ("2",)),
        KeyRange(("2",), ("3",)),
        KeyRange(("3",), ("2000",)),
    ]
    # And one key, or fewer rows than a range: the piece itself
    assert list(even_ranges(piece, 5, 5, 1000, 10)) == [piece]
    assert list(even_ranges(piece, 1, 1000, 10, 100)) == [piece]


def test_ranges_between_cover_the_piece_with_its_open_ends() -> None:
    piece = KeyRange(None, ("900",))
    assert ranges_between(piece, [("300",), ("600",)]) == [
        KeyRange(None, ("300",)),
        KeyRange(("300",), ("600",)),
        KeyRange(("600",), ("900",)),
    ]
    assert ranges_between(piece, []) == [piece]


def test_mismatched_ranges_are_found_by_position() -> None:
    # Given one `count sum` line per range on each side
    source = b"10 123\n0 0\n5 77"
    assert mismatched_ranges(source, source) == []
    # Then a changed sum and a range only the target fills are named with both aggregates
    assert mismatched_ranges(source, b"10 124\n1 9\n5 77") == [
        (0, Aggregate(10, "123"), Aggregate(10, "124")),
        (1, Aggregate(0, "0"), Aggregate(1, "9")),
    ]


def test_policy_starts_with_middle_sized_ranges_and_grows_them_while_differences_are_rare() -> None:
    # Given nothing seen yet / Then ranges of 64 rows, and the policy is not informed
    policy = AdaptivePolicy(10_000)
    assert policy.range_rows == 64 and not policy.informed
    # And after one difference in the first slice of 10,000 rows: larger ranges (no trend from one)
    policy.record(10_000, 1)
    assert policy.informed and policy.range_rows == 128
    # And a few differences over a million rows: a few hundred rows per range
    policy.record(990_000, 35)
    assert policy.range_rows == 256
    # And none at all: the largest ranges
    assert AdaptivePolicy(10_000, rows_seen=1_000_000).range_rows == 1024


def test_policy_shrinks_ranges_then_reads_every_line_once_differences_are_dense() -> None:
    # Given 1 row in 1,000 of the first slice differs / Then ranges of 64 rows, still aggregated
    sparse = AdaptivePolicy(10_000, rows_seen=10_000, differences_seen=10)
    assert sparse.range_rows == 64
    assert not sparse.every_line(RECORD_LINES_COST) and not sparse.every_line(TEXT_LINES_COST)
    # Given 1% of the rows differ / Then every row's line costs less than any range size, as records or text
    dense = AdaptivePolicy(10_000)
    dense.record(10_000, 100)
    assert dense.range_rows == 16
    assert dense.every_line(RECORD_LINES_COST) and dense.every_line(TEXT_LINES_COST)
    # Given 1 in 300: binary records already pay, text lines not yet
    middle = AdaptivePolicy(10_000, rows_seen=10_000, differences_seen=33)
    assert middle.every_line(RECORD_LINES_COST) and not middle.every_line(TEXT_LINES_COST)


def test_a_guess_never_turns_aggregates_off() -> None:
    # Given nothing seen yet, even against a line cost of zero / Then ranges are compared
    assert not AdaptivePolicy(10_000).every_line(0.0)


def test_multiset_buckets() -> None:
    assert multiset_bits(500) == 1
    assert multiset_bits(1_000_000) == 10
    assert multiset_bits(10**12) == 16
    source = {0: Aggregate(5, "10"), 1: Aggregate(3, "7"), 2: Aggregate(1, "1")}
    target = {0: Aggregate(5, "10"), 1: Aggregate(3, "8"), 3: Aggregate(1, "4")}
    # buckets differing, or present on one side only
    assert mismatched_buckets(source, target) == [1, 2, 3]


def test_prefix_ranges_cut_the_uuid_key_space_in_order_without_gaps() -> None:
    # Given 3 bits: 8 buckets
    ranges = [prefix_range(b, 3) for b in range(8)]
    # Then they are open at both ends and each starts where the one before ends
    assert ranges[0].lower is None and ranges[-1].upper is None
    assert all(ranges[i].upper == ranges[i + 1].lower for i in range(7))
    assert ranges[1].lower == ("20000000-0000-0000-0000-000000000000",)
    # And a uuid lies in the bucket of its leading bits (uuids order bytewise, as their lowercase text)
    for text in [
        "3fffffff-ffff-ffff-ffff-ffffffffffff",
        "40000000-0000-0000-0000-000000000000",
        "e0a1b2c3-0000-0000-0000-000000000001",
    ]:
        bucket = uuid.UUID(text).int >> 125
        key_range = ranges[bucket]
        assert (key_range.lower is None or key_range.lower[0] <= text) and (
            key_range.upper is None or text < key_range.upper[0]
        )


def test_integer_widths_cover_the_keys_in_at_most_the_buckets_asked_for() -> None:
    # Given keys from -7 to 1,000 in at most 2**4 buckets
    buckets = integer_widths(-7, 1_000, 4)
    ranges = [buckets.range(b) for b in range(buckets.count)]
    # Then the first is open below, the last above, each starts where the one before ends
    assert buckets.count <= 16 and ranges[0].lower is None and ranges[-1].upper is None
    assert all(ranges[i].upper == ranges[i + 1].lower for i in range(buckets.count - 1))
    # And every key from low to high lies in the bucket its width gives (as the SQL computes it)
    width = buckets.ranges.width
    for key in (-7, -1, 0, 62, 63, 500, 1_000):
        bucket = min(buckets.count - 1, (key + 7) // width)
        key_range = ranges[bucket]
        assert key_range.lower is None or int(key_range.lower[0]) <= key
        assert key_range.upper is None or key < int(key_range.upper[0])
