"""Key-range planning on real tables: every key type splits into ordered, disjoint ranges covering all rows."""

from __future__ import annotations

import itertools

import pytest
from psycopg2 import sql

from lambdas.core.catalog import describe_tables
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.ranges import plan_ranges, range_predicate
from lambdas.core.tables import TableName

TABLES = {
    "int_key": "CREATE TABLE int_key (id bigint PRIMARY KEY, v text); "
    "INSERT INTO int_key SELECT g * 3, 'v' FROM generate_series(1, 60000) g",
    # Inserted line-major, so the physical order differs from the key order.
    "composite_key": "CREATE TABLE composite_key (a bigint, b int, PRIMARY KEY (a, b)); "
    "INSERT INTO composite_key SELECT a, b FROM generate_series(1, 3) b, generate_series(1, 20000) a",
    "uuid_key": "CREATE TABLE uuid_key (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), n int); "
    "INSERT INTO uuid_key (n) SELECT g FROM generate_series(1, 60000) g",
    # Text keys whose text order differs from their numeric look ('10' < '9').
    "text_key": "CREATE TABLE text_key (k text PRIMARY KEY); INSERT INTO text_key SELECT g::text FROM generate_series(1, 60000) g",
}


@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_ranges_are_ordered_disjoint_and_cover_every_row(fresh_dbs: tuple[str, str], table_name: str) -> None:
    # Given a table of 60k rows with this kind of primary key
    src, _ = fresh_dbs
    conn = connect(src)
    execute(conn, TABLES[table_name])
    execute(conn, sql.SQL("ANALYZE {}").format(sql.Identifier(table_name)))
    table = TableName("public", table_name)
    info = describe_tables(conn, [table])[table]
    # When it is planned in chunks of about 10k rows
    ranges = plan_ranges(conn, info, 10_000)
    # Then there are several ranges, and their row counts add up to the table's exactly
    assert 3 <= len(ranges) <= 12
    counts = []
    for key_range in ranges:
        predicate, params = range_predicate(info.primary_key, info.key_types, key_range)
        counts.append(
            fetch_value(conn, sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table.ident, predicate), params)
        )
    assert sum(counts) == 60_000
    assert all(c > 0 for c in counts)
    # And consecutive boundaries rise strictly in the key's own order
    for left, right in itertools.pairwise(ranges):
        assert left.upper == right.lower and left.upper is not None
    bounds = [r.upper for r in ranges[:-1]]
    for low, high in itertools.pairwise(bounds):
        assert low is not None and high is not None
        casts = sql.SQL(", ").join(sql.SQL("%s::") + sql.SQL(t) for t in info.key_types)
        assert fetch_value(conn, sql.SQL("SELECT ({}) < ({})").format(casts, casts), [*low, *high])
    conn.close()
