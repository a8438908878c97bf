"""Reading the one row of a binary COPY stream (`session.parse_copy_row`), without a database."""

from __future__ import annotations

import struct

import pytest

from lambdas.core.validation.session import parse_copy_row

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
