"""Bisection decisions and the fetch-directly policy, without a database."""

from __future__ import annotations

from lambdas.core.ranges import KeyRange
from lambdas.core.validation.bisect import (
    MAX_DEPTH,
    AdaptivePolicy,
    Aggregate,
    Decision,
    Step,
    decide,
    fetch_limit,
    mismatched_buckets,
    multiset_bits,
    quantile_step,
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


def test_policy_keeps_aggregates_for_scattered_differences() -> None:
    # Given one difference in the first slice of 10,000 rows
    policy = AdaptivePolicy(10_000)
    policy.record(10_000, 1)
    # Then the next slice is still compared by aggregate first (one early difference is no trend)
    assert not policy.fetch_next
    # And a few differences over many slices keep it that way
    for _ in range(50):
        policy.record(10_000, 0)
    policy.record(10_000, 1)
    assert not policy.fetch_next


def test_policy_fetches_directly_once_differences_are_dense() -> None:
    # Given 1% of the rows of the first slice differ
    policy = AdaptivePolicy(10_000)
    assert not policy.fetch_next  # nothing seen yet
    policy.record(10_000, 100)
    # Then nearly every next slice would mismatch: fetch it directly
    assert policy.mismatch_probability > 0.99
    assert policy.fetch_next


def test_multiset_buckets() -> None:
    assert multiset_bits(500) == 1
    assert multiset_bits(1_000_000) == 10
    assert multiset_bits(10**12) == 16
    source = {0: Aggregate(5, "10"), 1: Aggregate(3, "7"), 2: Aggregate(1, "1")}
    target = {0: Aggregate(5, "10"), 1: Aggregate(3, "8"), 3: Aggregate(1, "4")}
    # buckets differing, or present on one side only
    assert mismatched_buckets(source, target) == [1, 2, 3]
