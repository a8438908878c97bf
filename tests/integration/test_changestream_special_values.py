"""PostgreSQL's special values (infinite timestamps and dates, numeric NaN and infinities, BC dates,
years past 9999) in Debezium's encodings, applied to a real target: converted in SQL, for a whole
batch and change by change, and converted in Python (the applier's second try for a change SQL
refused, and arrays), each giving the source's exact values."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from lambdas.core.changestream import state
from lambdas.core.changestream.applier import ChangeApplier
from lambdas.core.changestream.convert import ColumnType, to_text
from lambdas.core.changestream.target import StreamRouting
from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_value
from lambdas.core.tables import TableName
from tests.integration.test_changestream_applier import PREFIX, CollectingSink, Stream

SPECIALS = TableName("public", "specials")
DDL = """
CREATE TABLE specials (
    id    int PRIMARY KEY,
    ts    timestamp,
    ts3   timestamp(3),
    d     date,
    n     numeric,
    n2    numeric(10,2),
    f8    double precision,
    tstz  timestamptz,
    ds    date[],
    tss   timestamptz[],
    ts3s  timestamp(3)[]
)"""
COLUMNS = "id, ts, ts3, d, n, n2, f8, tstz, ds, tss, ts3s"
TYPES = {
    "ts": "timestamp without time zone",
    "ts3": "timestamp(3) without time zone",
    "d": "date",
    "n": "numeric",
    "n2": "numeric(10,2)",
    "f8": "double precision",
    "tstz": "timestamp with time zone",
    "ds": "date[]",
    "tss": "timestamp with time zone[]",
    "ts3s": "timestamp(3) without time zone[]",
}

# What Debezium 3.6.3 sent for these rows (tests/integration/test_debezium_stream.py reads them from it).
EVENTS: list[dict[str, Any]] = [
    {
        "id": 1,
        "ts": 9223372036825200000,
        "ts3": 9223372036825200,
        "d": -622191234,
        "n": "NAN",
        "n2": "NAN",
        "f8": "Infinity",
        "tstz": "infinity",
        "ds": [-622191234, None],
        "tss": ["infinity"],
        "ts3s": [9223372036825200],
    },
    {
        "id": 2,
        "ts": -9223372036832400000,
        "ts3": -9223372036832400,
        "d": -2147472691,
        "n": "POSITIVE_INFINITY",
        "n2": "12.50",
        "f8": "-Infinity",
        "tstz": "-infinity",
        "ds": [-2147472691],
        "tss": ["+292269055-12-02T23:00:00.000000Z", "1899-12-31T23:00:00.000000Z"],
        "ts3s": [-9223372036832400],
    },
    {
        "id": 3,
        "ts": -210866803200000000,  # 4714-11-24 00:00:00 BC, PostgreSQL's first instant
        "ts3": 9224318015999999,  # 294276-12-31 23:59:59.999, its last millisecond
        "d": -719528,  # 0001-01-01 BC
        "n": "NEGATIVE_INFINITY",
        "n2": "-0.00",
        "f8": "NaN",
        "tstz": "-4712-01-01T00:00:00.000000Z",
        "ds": [2932897, -141427],  # 10000-01-01, 1582-10-15 (the first day arrays may hold)
        "tss": [],
        "ts3s": [253402300800000],  # 10000-01-01
    },
]
EXPECTED = [
    (1, "infinity", "infinity", "infinity", "NaN", "NaN", "Infinity", "infinity", "{infinity,NULL}", '{infinity}', "{infinity}"),
    (2, "-infinity", "-infinity", "-infinity", "Infinity", "12.50", "-Infinity", "-infinity", "{-infinity}",
     '{-infinity,"1899-12-31 23:00:00+00"}', "{-infinity}"),
    (3, "4714-11-24 00:00:00 BC", "294276-12-31 23:59:59.999", "0001-01-01 BC", "-Infinity", "0.00", "NaN",
     "4713-01-01 00:00:00+00 BC", "{10000-01-01,1582-10-15}", "{}", '{"10000-01-01 00:00:00"}'),
]  # fmt: skip


@pytest.fixture
def target(fresh_dbs: tuple[str, str]) -> Iterator[Connection]:
    setup = connect(fresh_dbs[1])
    execute(setup, DDL)
    setup.close()
    with closing(connect(fresh_dbs[1], autocommit=False, application_name="zdm-applier-test")) as conn:
        state.ensure_state_tables(conn)
        yield conn


def target_rows(conn: Connection) -> list[tuple[Any, ...]]:
    result = fetch_all(conn, f"SELECT {', '.join(c + '::text' for c in COLUMNS.split(', '))} FROM specials ORDER BY id")
    conn.rollback()
    return [(int(row[0]), *row[1:]) for row in result]


@pytest.mark.parametrize("path", ["batch", "change by change"])
def test_special_values_arrive_as_the_sources_values(target: Connection, path: str) -> None:
    # Given the rows' creates as Debezium sent them, and (for the second path) a change whose date[] holds
    # 0044-03-15 BC as Debezium sends it (0044-03-15: era dropped), which makes the applier apply every
    # change on its own
    execute(target, "SET TimeZone = 'UTC'")
    target.commit()
    sink = CollectingSink()
    applier = ChangeApplier(target, StreamRouting.load(target, PREFIX, [SPECIALS]), sink)
    stream = Stream(f"{PREFIX}.public.specials")
    batch = [stream.create(row, (1000 + 10 * i, 1005 + 10 * i)) for i, row in enumerate(EVENTS)]
    if path == "change by change":
        batch.append(stream.create({"id": 4, "ds": [-703383]}, (2000, 2005)))
    # When the batch is applied
    result = applier.apply(batch)
    # Then nothing but that change is a dead letter, saying why
    poison = [3] if path == "change by change" else []
    assert [d.offset for d in result.dead_letters] == poison, [d.reason for d in result.dead_letters]
    assert all("before 1582-10-15" in d.reason for d in result.dead_letters), [d.reason for d in result.dead_letters]
    # And every value is the source's own: infinities, NaN, BC dates, years past 9999
    assert target_rows(target) == EXPECTED


def test_special_values_converted_in_python_read_back_as_the_sources_values(target: Connection) -> None:
    # Given each value as Debezium sent it, converted by Python to the text the type's input function takes
    execute(target, "SET TimeZone = 'UTC'")
    for event, expected in zip(EVENTS, EXPECTED, strict=True):
        for position, column in enumerate(COLUMNS.split(", ")[1:], start=1):
            text = to_text(event[column], ColumnType.of(TYPES[column]))
            # When PostgreSQL reads it as the column's type
            value = fetch_value(target, f"SELECT %s::{TYPES[column]}::text", (text,))
            # Then it is the source's value
            assert value == expected[position], (event["id"], column, text)
    target.rollback()
