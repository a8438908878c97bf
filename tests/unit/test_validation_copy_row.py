"""Reading COPY streams without a database: the one row of `session.parse_copy_row`, the fixed-width
records of `session.RecordFrames`, the lines of `session.LineFrames`."""

from __future__ import annotations

import random
import struct

import pytest

from lambdas.core.validation.session import LineFrames, RecordFrames, parse_copy_row

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)


def tuple_of(*fields: bytes | None) -> bytes:
    out = struct.pack(">h", len(fields))
    for field in fields:
        out += struct.pack(">i", -1) if field is None else struct.pack(">i", len(field)) + field
    return out


def test_fields_come_back_as_sent_with_null_as_none() -> None:
    # Given a stream of one row: an int8, an empty bytea, a NULL and bytes holding the signature itself
    stream = HEADER + tuple_of(struct.pack(">q", 3), b"", None, b"PGCOPY\xff\xff") + TRAILER
    # When parsed / Then each field is its bytes
    assert parse_copy_row(stream) == [struct.pack(">q", 3), b"", None, b"PGCOPY\xff\xff"]


def test_a_header_extension_is_skipped() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 3) + b"abc"
    assert parse_copy_row(header + tuple_of(b"x") + TRAILER) == [b"x"]


@pytest.mark.parametrize(
    "stream",
    [
        b"not copy",
        HEADER + TRAILER,  # no row
        HEADER + tuple_of(b"a") + tuple_of(b"b") + TRAILER,  # two rows
        HEADER + tuple_of(b"a"),  # cut short
    ],
    ids=["text", "no-row", "two-rows", "no-trailer"],
)
def test_anything_but_one_row_is_refused(stream: bytes) -> None:
    with pytest.raises(ValueError):
        parse_copy_row(stream)


# -- a stream of fixed-width records (`session.RecordFrames`) ----------------------------------------


def record_stream(records: list[bytes], header: bytes = HEADER) -> bytes:
    return header + b"".join(tuple_of(r) for r in records) + TRAILER


def cut_into_pieces(data: bytes, rng: random.Random, most: int) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        step = rng.randint(1, most)
        pieces.append(data[at : at + step])
        at += step
    return pieces


@pytest.mark.parametrize("block_bytes", [1, 50, 1 << 20])
def test_record_frames_cut_a_stream_into_blocks_of_whole_framed_records_however_it_arrives(block_bytes: int) -> None:
    # Given streams of 0 to 300 16-byte records (a header extension in some), arriving in pieces of any size
    rng = random.Random(block_bytes)
    for _ in range(50):
        records = [rng.randbytes(16) for _ in range(rng.randint(0, 300))]
        header = HEADER if rng.random() < 0.5 else b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 2) + b"ex"
        frames = RecordFrames(16, block_bytes=block_bytes)
        # When fed piece by piece, then ended
        blocks = [b for piece in cut_into_pieces(record_stream(records, header), rng, 70) for b in frames.feed(piece)]
        blocks += frames.end()
        # Then the blocks are every record behind its 6-byte frame, in order, each block whole records
        assert b"".join(blocks) == b"".join(tuple_of(r) for r in records)
        assert all(b and len(b) % 22 == 0 for b in blocks)
        assert frames.rows == len(records)


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        (b"not a copy stream at all", "not a binary COPY stream"),
        (HEADER + tuple_of(b"a" * 16) + tuple_of(None) + tuple_of(b"b" * 16) + TRAILER, "a NULL"),
        (
            HEADER + tuple_of(b"a" * 16) + tuple_of(b"b" * 8) + tuple_of(b"c" * 8) + tuple_of(b"d" * 16) + TRAILER,
            "width",
        ),
        (HEADER + tuple_of(b"a" * 16, b"b" * 16) + TRAILER, "two fields"),
        (HEADER + tuple_of(b"a" * 16), "no trailer"),
        (HEADER[:10], "cut in the header"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_record_frames_refuse_a_stream_that_is_not_one_field_of_the_width(stream: bytes, fault: str) -> None:
    # Given a stream with a NULL, a field of another width, two fields a row, no trailer... (small blocks:
    # every frame is checked, wherever the fault is)
    frames = RecordFrames(16, block_bytes=1)
    # When fed and ended / Then refused, never cut into records that would be diffed
    with pytest.raises(ValueError, match="binary COPY stream"):
        for piece in cut_into_pieces(stream, random.Random(1), 7):
            frames.feed(piece)
        frames.end()


# -- a stream of lines (`session.LineFrames`) ----------------------------------------------------


@pytest.mark.parametrize("block_bytes", [1, 40, 1 << 20])
def test_line_frames_cut_a_stream_into_blocks_of_whole_lines_however_it_arrives(block_bytes: int) -> None:
    # Given streams of 0 to 200 lines of any length (long ones too), arriving in pieces of any size
    rng = random.Random(block_bytes)
    for _ in range(50):
        lines = [b"k" * rng.randint(0, 120) + b"\t" + str(rng.getrandbits(40)).encode() + b"\n" for _ in range(200)]
        lines = lines[: rng.randint(0, 200)]
        frames = LineFrames(block_bytes=block_bytes)
        # When fed piece by piece, then ended
        blocks = [b for piece in cut_into_pieces(b"".join(lines), rng, 70) for b in frames.feed(piece)]
        blocks += frames.end()
        # Then the blocks are the lines, in order, each block whole lines, and every row counted
        assert b"".join(blocks) == b"".join(lines)
        assert all(b and b.endswith(b"\n") for b in blocks)
        assert frames.rows == len(lines)


def test_line_frames_refuse_a_stream_that_ends_inside_a_line() -> None:
    frames = LineFrames(block_bytes=1)
    assert frames.feed(b"a\t1\nb\t") == [b"a\t1\n"]
    with pytest.raises(ValueError, match="whole line"):
        frames.end()
