"""Key-range planning, the pure parts."""

from __future__ import annotations

import itertools

from psycopg2 import sql

from lambdas.core.ranges import (
    KeyRange,
    chunk_count,
    integer_boundaries,
    pick_boundaries,
    ranges_from_boundaries,
)


class FakeConn:
    """Enough of a connection for sql.Composable.as_string (quoting only)."""

    encoding = "UTF8"


def test_ranges_cover_the_whole_key_space_without_overlap() -> None:
    ranges = ranges_from_boundaries([("10",), ("20",)])
    assert ranges == [KeyRange(None, ("10",)), KeyRange(("10",), ("20",)), KeyRange(("20",), None)]
    for left, right in itertools.pairwise(ranges):
        assert left.upper == right.lower


def test_integer_boundaries_split_evenly_and_stay_inside_the_range() -> None:
    assert integer_boundaries(1, 100, 4) == [("26",), ("51",), ("76",)]  # four ranges of 25 keys
    assert integer_boundaries(5, 5, 4) == []
    assert integer_boundaries(1, 3, 10) == [("2",), ("3",)]


def test_pick_boundaries_from_sample_is_distinct_and_sorted() -> None:
    sample = [(str(i // 3),) for i in range(30)]  # duplicates in the sample
    picked = pick_boundaries(sample, 5)
    assert picked == sorted(set(picked))
    assert 1 <= len(picked) <= 4
    assert pick_boundaries([], 5) == []
    assert pick_boundaries(sample, 1) == []


def test_chunk_count_rounds_up_and_is_at_least_one() -> None:
    assert chunk_count(0, 100) == 1
    assert chunk_count(101, 100) == 2


def test_key_range_round_trips_through_json() -> None:
    r = KeyRange(("1", "a"), None)
    assert KeyRange.from_json(r.to_json()) == r


def test_range_predicate_uses_row_comparison_for_composite_keys() -> None:
    from lambdas.core.ranges import range_predicate

    predicate, params = range_predicate(
        ["order_id", "line_no"], ["bigint", "integer"], KeyRange(("5", "1"), ("9", "2"))
    )
    assert isinstance(predicate, sql.Composed)
    assert params == ["5", "1", "9", "2"]
    _, none = range_predicate(["id"], ["bigint"], KeyRange(None, None))
    assert none == []
