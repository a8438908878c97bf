"""The rehearsal's final row compare (rehearsal/compare.py): every column of every row counts, exactly."""

from __future__ import annotations

import pytest

from lambdas.core.db import connect, execute
from lambdas.core.tables import TableName
from rehearsal.compare import compare_databases


def _setup(dsns: tuple[str, str], ddl: str, src_sql: str, tgt_sql: str) -> None:
    for dsn, data in zip(dsns, (src_sql, tgt_sql), strict=True):
        conn = connect(dsn)
        execute(conn, ddl)
        execute(conn, data)
        conn.close()


def _ndiff(dsns: tuple[str, str], table: str) -> int:
    diffs = compare_databases(dsns[0], dsns[1], [TableName.parse(table)])
    return sum(len(d.missing_on_target) + len(d.extra_on_target) + len(d.changed) for d in diffs)


# --- values the compare must tell apart ---
@pytest.mark.parametrize(
    ("coltype", "src_val", "tgt_val"),
    [
        ("text", "NULL", "''"),
        ("text", "'a'", "'a '"),
        ("text", "'Zoë'", "'Zoe'"),
        ("text", "'abc'", "'ABC'"),
        ("double precision", "0.1::float8 + 0.2::float8", "0.3"),
        ("real", "'0.3'", "'0.30000004'"),
        ("double precision", "1.0000000000000002", "1.0"),
        ("numeric", "1.50", "1.5"),
        ("timestamptz", "'2024-01-01 00:00:00+00'", "'2024-01-01 00:00:00+01'"),
        ("timestamptz", "'2024-01-01 00:00:00.000001+00'", "'2024-01-01 00:00:00+00'"),
        ("jsonb", "'{\"a\": 1}'", "'{\"a\": 2}'"),
        ("jsonb", "'{\"a\": null}'", "'{}'"),
        ("jsonb", "'null'", "NULL"),
        ("bytea", "'\\x00'", "'\\x0000'"),
        ("bytea", "''", "NULL"),
    ],
)
def test_value_differences_are_found(fresh_dbs: tuple[str, str], coltype: str, src_val: str, tgt_val: str) -> None:
    ddl = f"CREATE TABLE v (id int PRIMARY KEY, val {coltype})"
    _setup(fresh_dbs, ddl, f"INSERT INTO v VALUES (1, {src_val})", f"INSERT INTO v VALUES (1, {tgt_val})")
    assert _ndiff(fresh_dbs, "public.v") == 1


def test_equal_tables_compare_equal_across_pk_types(fresh_dbs: tuple[str, str]) -> None:
    ddl = "CREATE TABLE c (a text, b int, v text, PRIMARY KEY (a, b))"
    rows = "INSERT INTO c SELECT 'k,' || g || '\"é', g, 'v' FROM generate_series(1, 3000) g"
    _setup(fresh_dbs, ddl, rows, rows)
    assert _ndiff(fresh_dbs, "public.c") == 0


# --- a column named like the compare's aliases (once: it stood for the whole row, or was ambiguous) ---
def test_a_column_named_t_does_not_hide_a_difference_in_another_column(fresh_dbs: tuple[str, str]) -> None:
    ddl = "CREATE TABLE tagged (id int PRIMARY KEY, t text, amount numeric)"
    _setup(
        fresh_dbs,
        ddl,
        "INSERT INTO tagged VALUES (1, 'x', 100.00)",
        "INSERT INTO tagged VALUES (1, 'x', 999.99)",  # the amount differs
    )
    assert _ndiff(fresh_dbs, "public.tagged") == 1


def test_a_table_without_primary_key_is_compared_as_a_multiset(fresh_dbs: tuple[str, str]) -> None:
    ddl = "CREATE TABLE nopk (a int, b text)"
    _setup(fresh_dbs, ddl, "INSERT INTO nopk VALUES (1, 'x')", "INSERT INTO nopk VALUES (1, 'y')")
    assert _ndiff(fresh_dbs, "public.nopk") == 2  # (1,'x') missing on the target, (1,'y') extra


def test_a_table_without_primary_key_counts_duplicates(fresh_dbs: tuple[str, str]) -> None:
    ddl = "CREATE TABLE nopk2 (a int, b text)"
    _setup(
        fresh_dbs,
        ddl,
        "INSERT INTO nopk2 VALUES (1, 'x'), (2, 'y')",
        "INSERT INTO nopk2 VALUES (1, 'x'), (1, 'x'), (2, 'y')",
    )
    assert _ndiff(fresh_dbs, "public.nopk2") == 1


def test_a_column_named_k_is_compared(fresh_dbs: tuple[str, str]) -> None:
    ddl = "CREATE TABLE kk (id int PRIMARY KEY, k text, amount numeric)"
    _setup(fresh_dbs, ddl, "INSERT INTO kk VALUES (1, 'x', 1)", "INSERT INTO kk VALUES (1, 'x', 2)")
    assert _ndiff(fresh_dbs, "public.kk") == 1
