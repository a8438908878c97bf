"""Row diffing without a database: (key, hash) lines, rows by key naming columns, multisets, re-checks."""

from __future__ import annotations

import random
import struct
import uuid

import pytest

from lambdas.core.validation.model import Key
from lambdas.core.validation.rowdiff import (
    ABSENT,
    INT8_RECORDS,
    Kind,
    RecordLayout,
    RowDifference,
    RowImage,
    diff_hash_lines,
    diff_hash_records,
    diff_line_streams,
    diff_record_streams,
    diff_row,
    multiset_diff,
    parse_hash_line,
    parse_row_images,
    settle,
    settle_multiset,
    unescape_copy,
)

COLUMNS = ["id", "name", "note"]


def row(*values: str | None, version: str | None = None) -> RowImage:
    return RowImage(tuple(values), version)


# --- (key, hash) lines ------------------------------------------------------------------------


def test_escaped_key_text_is_restored() -> None:
    # Given key text escaped as COPY does (backslash, tab, newline, carriage return)
    assert unescape_copy(r"a\tb\nc\\d\re") == "a\tb\nc\\d\re"
    assert unescape_copy("plain é") == "plain é"


def test_a_line_splits_into_key_and_hash() -> None:
    assert parse_hash_line(b"42\tx\\ty\t-9001", 2) == (("42", "x\ty"), "-9001")
    with pytest.raises(ValueError, match="expected 1 key column"):
        parse_hash_line(b"1\t2\t3", 1)


def test_equal_lines_give_no_difference() -> None:
    text = b"1\t10\n2\t20\n3\t30"
    assert not diff_hash_lines(text, text, 1)


def test_lines_in_another_order_are_still_equal() -> None:
    assert not diff_hash_lines(b"1\t10\n2\t20", b"2\t20\n1\t10", 1)


def test_missing_extra_and_changed_keys_are_told_apart() -> None:
    # Given the target lost key 2, gained key 4 and changed key 3
    source = b"1\t10\n2\t20\n3\t30"
    target = b"1\t10\n3\t31\n4\t40"
    # When the lines are diffed
    diff = diff_hash_lines(source, target, 1)
    # Then each key lands in its kind
    assert (diff.missing, diff.extra, diff.changed) == ([("2",)], [("4",)], [("3",)])
    assert sorted(diff.keys) == [("2",), ("3",), ("4",)]


def test_non_ascii_keys_are_decoded_only_where_lines_differ() -> None:
    source = "Zoë\t1\n李\t2".encode()
    target = "Zoë\t1\n李\t3".encode()
    assert diff_hash_lines(source, target, 1).changed == [("李",)]


def test_empty_sides() -> None:
    diff = diff_hash_lines(b"", b"7\t1", 1)
    assert (diff.missing, diff.extra, diff.changed) == ([], [("7",)], [])


# --- (key, hash) binary records of a single integer key ---------------------------------------


def records(*pairs: tuple[int, int]) -> bytes:
    return b"".join(INT8_RECORDS.record.pack(key, digest) for key, digest in pairs)


def reference_diff(source: list[tuple[int, int]], target: list[tuple[int, int]]) -> tuple[list[int], ...]:
    """The plain answer, by dictionaries: (missing, extra, changed) keys, sorted."""
    src, tgt = dict(source), dict(target)
    return (
        sorted(k for k in src if k not in tgt),
        sorted(k for k in tgt if k not in src),
        sorted(k for k in src if k in tgt and src[k] != tgt[k]),
    )


def as_ints(keys: list[Key]) -> list[int]:
    return [int(k[0]) for k in keys]


def test_records_missing_extra_and_changed_at_both_ends_and_in_between() -> None:
    # Given the target lost the first row, changed one in the middle, gained one in a gap and one after the end
    source = [(-(2**63), 1), (-5, 2), (0, 3), (7, 4), (2**63 - 1, 5)]
    target = [(-5, 2), (0, 30), (3, 9), (7, 4), (2**63 - 1, 5)]
    # When diffed / Then each key is named once, with its kind; keys keep their sign and full width
    diff = diff_hash_records(records(*source), records(*target))
    assert (as_ints(diff.missing), as_ints(diff.extra), as_ints(diff.changed)) == ([-(2**63)], [3], [0])
    assert diff.missing == [(str(-(2**63)),)]


def test_equal_records_and_empty_sides() -> None:
    same = records((1, 1), (2, 2))
    assert not diff_hash_records(same, same)
    assert as_ints(diff_hash_records(b"", same).extra) == [1, 2]
    assert as_ints(diff_hash_records(same, b"").missing) == [1, 2]


@pytest.mark.parametrize("shuffle", ["neither", "target", "both"])
def test_records_diff_equals_the_plain_answer_for_any_rows_and_order(shuffle: str) -> None:
    # Given 400 random pairs of sides (runs of equal rows, every kind of difference, adjacent ones)
    rng = random.Random(7)
    for _ in range(400):
        keys = sorted(rng.sample(range(-100, 400), rng.randint(0, 80)))
        source = [(k, rng.getrandbits(64) - 2**63) for k in keys]
        target = [(k, h if rng.random() > 0.1 else h ^ 1) for k, h in source if rng.random() > 0.1]
        gaps = sorted(set(range(-120, 420)) - set(keys))
        target = sorted(target + [(k, 5) for k in rng.sample(gaps, rng.randint(0, 4))])
        if shuffle != "neither":
            rng.shuffle(target)
        if shuffle == "both":
            rng.shuffle(source)
        # When diffed / Then the same keys as the plain answer (order only changes the speed)
        diff = diff_hash_records(records(*source), records(*target))
        assert (as_ints(diff.missing), as_ints(diff.extra), as_ints(diff.changed)) == reference_diff(source, target)


@pytest.mark.parametrize("rate", [0.0005, 0.005, 0.05])
def test_records_diff_of_long_sides_equals_the_plain_answer(rate: float) -> None:
    # Given long sides (equal runs of thousands of records: spans double, end at the sides' ends), with
    # differences at a given rate, changing one bit anywhere in the hash, or a key's sign
    rng = random.Random(int(rate * 10_000))
    for _ in range(30):
        keys = sorted(rng.sample(range(-50_000, 50_000), rng.randint(1_000, 5_000)))
        source = [(k, rng.getrandbits(64) - 2**63) for k in keys]
        taken = set(keys)
        target = []
        for k, h in source:
            roll = rng.random()
            if roll < rate / 3:
                continue  # missing
            if roll < 2 * rate / 3:
                target.append((k, h ^ (1 << rng.randrange(63))))  # changed in one bit
            elif roll < rate and k + 1 not in taken:
                target += [(k, h), (k + 1, h)]  # an extra row in the gap after k
            else:
                target.append((k, h))
        if rng.random() < 0.5:
            target.append((-source[0][0] - 60_000, 1))  # an extra key of the other sign, first or last
        target.sort()
        # When diffed / Then the same keys as the plain answer
        diff = diff_hash_records(records(*source), records(*target))
        assert (as_ints(diff.missing), as_ints(diff.extra), as_ints(diff.changed)) == reference_diff(source, target)


def in_blocks(pairs: list[tuple[int, int]], rng: random.Random) -> list[bytes]:
    """The records, each behind a 6-byte frame (as `session.RecordFrames` passes them on), cut into blocks of
    0 to 40 records."""
    return joined_in_blocks([b"\x00\x01\x00\x00\x00\x10" + INT8_RECORDS.record.pack(k, h) for k, h in pairs], rng, 40)


def joined_in_blocks(items: list[bytes], rng: random.Random, most: int) -> list[bytes]:
    """The items in order, joined into blocks of 0 to `most` items each."""
    blocks, at = [], 0
    while at < len(items):
        step = rng.randint(0, most)
        blocks.append(b"".join(items[at : at + step]))
        at += step
    return blocks


@pytest.mark.parametrize("rate", [0.0005, 0.02, 0.3])
def test_records_streamed_in_framed_blocks_diff_to_the_plain_answer(rate: float) -> None:
    # Given sides with differences at a given rate (a run of missing rows at the start of some), each side
    # arriving in blocks of its own random sizes (empty ones too), every record behind a frame
    rng = random.Random(int(rate * 10_000) + 1)
    for _ in range(40):
        keys = sorted(rng.sample(range(-5_000, 5_000), rng.randint(0, 2_000)))
        source = [(k, rng.getrandbits(64) - 2**63) for k in keys]
        target = [(k, h ^ 1 if rng.random() < rate / 2 else h) for k, h in source if rng.random() > rate / 2]
        if rng.random() < 0.3:
            target = target[rng.randint(0, 100) :]
        gaps = sorted(set(range(-5_100, 5_100)) - set(keys))
        target = sorted(target + [(k, 5) for k in rng.sample(gaps, int(rate * len(keys)))])
        # When diffed as streams
        diff = diff_record_streams(in_blocks(source, rng), in_blocks(target, rng), INT8_RECORDS, frame=6)
        # Then the same keys as the plain answer: a block's end never hides or invents a difference
        assert (as_ints(diff.missing), as_ints(diff.extra), as_ints(diff.changed)) == reference_diff(source, target)


def line_blocks(rows: list[tuple[Key, str]], rng: random.Random) -> list[bytes]:
    """`key<TAB>...<TAB>hash` lines as COPY's text format writes them (tab, newline and backslash in a key
    escaped), cut into blocks of 0 to 30 whole lines."""

    def escaped(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

    lines = [("\t".join(escaped(k) for k in key) + "\t" + digest + "\n").encode() for key, digest in rows]
    return joined_in_blocks(lines, rng, 30)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("rate", [0.002, 0.05, 0.4])
def test_lines_streamed_in_blocks_diff_to_the_plain_answer(rate: float, shuffle: bool) -> None:
    # Given (text, text) keys with tabs, newlines, backslashes and non-ASCII in some, hashes of any length
    # (a changed hash may extend the other: 12 and 123), sides in the same key order or the target
    # shuffled, each arriving in blocks of its own random sizes
    rng = random.Random(int(rate * 1_000) + shuffle)
    alphabet = ["a", "b", "\t", "\n", "\\", "é", "z"]
    for _ in range(40):
        keys = {("".join(rng.choices(alphabet, k=rng.randint(0, 4))), str(rng.randint(0, 30))) for _ in range(300)}
        source = sorted(((k, str(rng.getrandbits(rng.randint(1, 64)))) for k in keys), key=lambda r: r[0])
        target = []
        for key, digest in source:
            roll = rng.random()
            if roll < rate / 2:
                continue  # missing
            target.append((key, digest + "7" if roll < rate else digest))  # changed: the hash one digit longer
        target += [((f"new{n}", "0"), "5") for n in range(int(rate * 20))]
        target.sort(key=lambda r: r[0])
        if shuffle:
            rng.shuffle(target)
        # When diffed as streams
        diff = diff_line_streams(line_blocks(source, rng), line_blocks(target, rng), 2)
        # Then the same keys as the plain answer
        src, tgt = dict(source), dict(target)
        assert diff.missing == sorted(k for k in src if k not in tgt)
        assert diff.extra == sorted(k for k in tgt if k not in src)
        assert diff.changed == sorted(k for k in src if k in tgt and src[k] != tgt[k])


def test_a_block_of_lines_cut_inside_a_line_is_refused() -> None:
    with pytest.raises(ValueError, match="whole line"):
        diff_line_streams([b"a\t1\nb\t2"], [b"a\t1\n"], 1)


def test_records_of_a_broken_length_are_refused() -> None:
    with pytest.raises(ValueError, match="not a multiple of 16"):
        diff_hash_records(records((1, 1)) + b"x", records((1, 2)))


@pytest.mark.parametrize(
    ("key_types", "size"),
    [(["bigint"], 16), (["smallint"], 16), (["uuid"], 24), (["integer", "uuid"], 32), (["uuid", "bigint"], 32)],
)
def test_keys_of_integer_and_uuid_columns_have_a_record_layout(key_types: list[str], size: int) -> None:
    layout = RecordLayout.of(key_types)
    assert layout is not None and layout.record.size == size


@pytest.mark.parametrize("key_types", [["text"], ["integer", "numeric"], ["uuid", "date"], []])
def test_other_keys_have_no_record_layout(key_types: list[str]) -> None:
    assert RecordLayout.of(key_types) is None


@pytest.mark.parametrize("shuffle", ["neither", "target"])
def test_records_of_an_integer_and_uuid_key_diff_to_the_plain_answer(shuffle: str) -> None:
    # Given 200 random pairs of sides keyed by (integer, uuid), in PostgreSQL's key order (uuids bytewise)
    layout = RecordLayout.of(["integer", "uuid"])
    assert layout is not None
    rng = random.Random(11)

    def packed(rows: list[tuple[tuple[int, bytes], int]]) -> bytes:
        return b"".join(layout.record.pack(a, b, h) for (a, b), h in rows)

    for _ in range(200):
        keys = sorted({(rng.randint(-3, 3), rng.randbytes(16)) for _ in range(rng.randint(0, 60))})
        source = [(k, rng.getrandbits(64) - 2**63) for k in keys]
        target = [(k, h if rng.random() > 0.1 else h ^ 1) for k, h in source if rng.random() > 0.1]
        target = sorted(target + [((rng.randint(-3, 3), rng.randbytes(16)), 5) for _ in range(rng.randint(0, 4))])
        if shuffle == "target":
            rng.shuffle(target)
        # When diffed
        diff = diff_hash_records(packed(source), packed(target), layout)
        # Then the same keys as the plain answer, named as the server prints them (an integer, a hyphenated uuid)
        src, tgt = dict(source), dict(target)

        def texts(keys: list[tuple[int, bytes]]) -> list[Key]:
            return [(str(a), str(uuid.UUID(bytes=b))) for a, b in sorted(keys)]

        assert diff.missing == texts([k for k in src if k not in tgt])
        assert diff.extra == texts([k for k in tgt if k not in src])
        assert diff.changed == texts([k for k in src if k in tgt and src[k] != tgt[k]])


# --- rows by primary key --------------------------------------------------------------------


def test_a_changed_row_names_exactly_the_differing_columns() -> None:
    difference = diff_row(("1",), COLUMNS, row("1", "Zoë", "a"), row("1", "Zoe", "a"))
    assert difference == RowDifference(("1",), Kind.CHANGED, ("name",))


def test_null_and_empty_string_differ() -> None:
    assert diff_row(("1",), COLUMNS, row("1", "x", None), row("1", "x", "")) == RowDifference(
        ("1",), Kind.CHANGED, ("note",)
    )


def test_missing_extra_and_equal_rows() -> None:
    assert diff_row(("1",), COLUMNS, row("1", "a", None), ABSENT) == RowDifference(("1",), Kind.MISSING)
    assert diff_row(("1",), COLUMNS, ABSENT, row("1", "a", None)) == RowDifference(("1",), Kind.EXTRA)
    assert diff_row(("1",), COLUMNS, row("1", "a", None), row("1", "a", None)) is None
    assert diff_row(("1",), COLUMNS, ABSENT, ABSENT) is None


def test_row_images_keep_the_sides_key_order_absence_and_versions() -> None:
    # Given records of two columns' hashes for keys asked for as a, b, c: the side returned them in
    # its key order c, a, b; b does not exist (negative position), a was read with xmin 7, c without
    keys = [("a",), ("b",), ("c",)]
    record = struct.Struct(">4q")
    data = record.pack(3, 0, 11, -12) + record.pack(1, 7, 5, 6) + record.pack(-2, 0, -1, -2)
    # When parsed
    order, images = parse_row_images(data, 2, keys)
    # Then the order is the side's, b is absent, and only a carries a version
    assert order == [("c",), ("a",), ("b",)]
    assert images[("c",)] == RowImage((11, -12), None)
    assert images[("a",)] == RowImage((5, 6), "7")
    assert images[("b",)] == ABSENT
    # And a cut record is refused
    with pytest.raises(ValueError, match="not a multiple of 32"):
        parse_row_images(data[:-1], 2, keys)


# --- re-checks while replication runs -------------------------------------------------------


def test_a_difference_gone_after_the_target_caught_up_was_in_flight() -> None:
    # Given the source row at version 7 and the target, caught up, holding the same row
    key = ("1",)
    outcome = settle([key], COLUMNS, {key: row("1", "new", None, version="7")}, {key: row("1", "new", None)}, {})
    # Then it is resolved (transient)
    assert outcome.resolved == [key] and not outcome.persistent and not outcome.retry


def test_a_difference_on_a_row_the_source_did_not_touch_is_persistent() -> None:
    # Given the source row kept version 7 across both reads and the caught-up target differs
    key: Key = ("1",)
    first: dict[Key, RowImage] = {key: row("1", "good", None, version="7")}
    outcome = settle([key], COLUMNS, first, {key: row("1", "tampered", None)}, dict(first))
    # Then it is persistent, naming the column
    assert outcome.persistent == [RowDifference(key, Kind.CHANGED, ("name",))]


def test_a_row_the_source_changed_meanwhile_is_checked_again() -> None:
    # Given the source row moved from version 7 to 8 between the reads
    key = ("1",)
    outcome = settle(
        [key],
        COLUMNS,
        {key: row("1", "a", None, version="7")},
        {key: row("1", "b", None)},
        {key: row("1", "b", None, version="8")},
    )
    # Then nothing is decided yet
    assert outcome.retry == [key] and not outcome.persistent and not outcome.resolved


def test_a_row_missing_on_the_target_while_the_source_kept_it_is_persistent() -> None:
    key: Key = ("5",)
    first: dict[Key, RowImage] = {key: row("5", "x", None, version="9")}
    assert settle([key], COLUMNS, first, {}, dict(first)).persistent == [RowDifference(key, Kind.MISSING)]


def test_an_extra_row_needs_two_sightings_with_the_same_target_version() -> None:
    # Given a row only the target has (no source version can prove it stayed absent)
    key: Key = ("9",)
    target: dict[Key, RowImage] = {key: row("9", "x", None, version="100")}
    # When first seen / Then it is kept for confirmation, not reported
    first = settle([key], COLUMNS, {}, target, {})
    assert first.retry == [key] and first.extra_seen == {key: "100"} and not first.persistent
    # When seen again with the same target version / Then it is persistent
    second = settle([key], COLUMNS, {}, target, {}, first.extra_seen)
    assert second.persistent == [RowDifference(key, Kind.EXTRA)]
    # But a target row re-inserted meanwhile (new version) starts over
    third = settle([key], COLUMNS, {}, {key: row("9", "x", None, version="101")}, {}, first.extra_seen)
    assert third.retry == [key] and not third.persistent


# --- multisets --------------------------------------------------------------------------------


def test_multiset_diff_counts_copies() -> None:
    # Given a row twice on the source and once on the target, and a row only on the target
    diff = multiset_diff({"(1,a)": 2, "(2,b)": 1}, {"(1,a)": 1, "(2,b)": 1, "(3,c)": 1})
    assert diff.missing == {"(1,a)": 1}
    assert diff.extra == {"(3,c)": 1}


def test_multiset_recheck_needs_the_same_difference_twice() -> None:
    rows = ["(1,a)", "(2,b)", "(3,c)"]
    first = {"(1,a)": 2, "(2,b)": 1, "(3,c)": 1}
    target = {"(1,a)": 1, "(2,b)": 1, "(3,c)": 2}
    # When first seen: (2,b) now matches (in flight); the others are held for confirmation
    resolved, persistent, retry, seen = settle_multiset(rows, first, target, first)
    assert resolved == ["(2,b)"] and not persistent and retry == ["(1,a)", "(3,c)"]
    # When seen again the same / Then persistent, with the copies
    _, persistent, retry, _ = settle_multiset(retry, first, target, first, seen)
    assert persistent.missing == {"(1,a)": 1} and persistent.extra == {"(3,c)": 1} and not retry
