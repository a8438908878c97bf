"""The validator on real PostgreSQL pairs: identical data is equal, every injected difference is found
and named, nothing else is reported; and the same under live logical replication with writes running."""

from __future__ import annotations

import functools
import hashlib
import io
import time
import uuid
from collections.abc import Callable, Sequence

import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from lambdas.core.config import LogicalSettings, Validation
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.lsn import Lsn
from lambdas.core.tables import TableName
from lambdas.core.validation import (
    ChunkResult,
    ChunkStep,
    Replication,
    RowHash,
    SessionPair,
    ValidationSummary,
    plan_validation,
    queries,
    run_chunks,
    summarize,
    validate,
)
from lambdas.core.validation.bisect import KeyBuckets
from lambdas.core.validation.model import TableSpec
from lambdas.core.validation.queries import Where
from lambdas.core.validation.session import CopyStream, Frames, LineFrames, RecordFrames
from rehearsal import sample
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload
from tests.integration.db_env import query, run_sql

KINDS = TableName("public", "kinds")
SMALL = Validation(chunk_rows=1_000, slice_rows=200, report_first_keys=50)


def both(src: str, tgt: str, statement: str) -> None:
    for dsn in (src, tgt):
        run_sql(dsn, statement)


def clone(src: str, tgt: str, tables: Sequence[TableName]) -> None:
    """Copy rows exactly (binary COPY) from the source to the same, empty tables on the target."""
    source, target = connect(src), connect(tgt)
    try:
        for table in tables:
            buffer = io.BytesIO()
            with source.cursor() as cur:
                cur.copy_expert(sql.SQL("COPY {} TO STDOUT (FORMAT binary)").format(table.ident), buffer)
            buffer.seek(0)
            with target.cursor() as cur:
                cur.copy_expert(sql.SQL("COPY {} FROM STDIN (FORMAT binary)").format(table.ident), buffer)
            execute(target, sql.SQL("ANALYZE {}").format(table.ident))
    finally:
        source.close()
        target.close()


def check(
    src: str, tgt: str, tables: Sequence[TableName], settings: Validation = SMALL, **kwargs: object
) -> ValidationSummary:
    return validate(src, tgt, tables, settings, workers=2, **kwargs)  # type: ignore[arg-type]


def listed(summary: ValidationSummary) -> dict[str, list[tuple[list[str], list[str]]]]:
    """Every reported difference: kind -> [(key, columns)], over all tables."""
    out: dict[str, list[tuple[list[str], list[str]]]] = {"missing": [], "extra": [], "changed": [], "unsettled": []}
    for table in summary.per_table:
        for kind in out:
            out[kind] += [(k.key, k.columns) for k in getattr(table, kind).first]
    return {k: v for k, v in out.items() if v}


# --- identical data -----------------------------------------------------------------------------


def test_identical_shop_tables_of_every_key_type_have_no_difference(fresh_dbs: tuple[str, str]) -> None:
    # Given the sample shop (bigint, serial, composite and uuid keys) copied exactly to the target
    src, tgt = fresh_dbs
    tables = [TableName.parse(t) for t in sample.SAMPLE_TABLES]
    both(src, tgt, sample.SCHEMA_SQL)
    conn = connect(src)
    sizes = sample.load_data(conn, 20_000)
    conn.close()
    clone(src, tgt, tables)
    # When validated in chunks of 2,000 rows, slices of 500
    summary = check(src, tgt, tables, Validation(chunk_rows=2_000, slice_rows=500))
    # Then every row was compared and nothing differs
    assert summary.ok, listed(summary)
    assert summary.differences == summary.unsettled == summary.transient == summary.problems == 0
    assert summary.rows_compared == summary.target_rows == sizes.total
    assert {t.table: t.source_rows for t in summary.per_table} == {
        "public.customers": sizes.customers,
        "public.events": sizes.events,
        "public.order_items": sizes.order_items,
        "public.orders": sizes.orders,
        "public.products": sizes.products,
    }
    assert summary.chunks > len(tables)  # the larger tables were cut into several chunks
    assert summary.rows_per_second > 0


# --- each kind of difference, in each column type --------------------------------------------

KINDS_SQL = """
CREATE TABLE kinds (
    id      bigint PRIMARY KEY,
    label   text NOT NULL,
    note    text,
    ratio   double precision,
    at      timestamptz,
    doc     jsonb,
    amount  numeric,
    blob    bytea,
    name    text
);
INSERT INTO kinds
SELECT g, 'row ' || g,
       CASE WHEN g % 2 = 0 THEN '' END,                     -- '' on even rows, NULL on odd rows
       CASE WHEN g = 10 THEN 0.3 ELSE g / 3.0 END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
       jsonb_build_object('a', g, 'b', 'x'),
       (g || '.0')::numeric,                                -- scale 1: '13.0'
       decode(md5(g::text), 'hex'),
       'Zoë Ångström – 李小龍 ' || g
FROM generate_series(1, 3000) g;
ANALYZE kinds;
"""

# (what is done on the target, expected {kind: [(key, columns)]}); an empty expectation means equal.
CASES: dict[str, tuple[str, dict[str, list[tuple[list[str], list[str]]]]]] = {
    "deleted row": ("DELETE FROM kinds WHERE id = 1500", {"missing": [(["1500"], [])]}),
    "extra row in the key space": (
        "INSERT INTO kinds (id, label) VALUES (3001, 'new')",
        {"extra": [(["3001"], [])]},
    ),
    "extra row before the first key": (
        "INSERT INTO kinds (id, label) VALUES (-5, 'new')",
        {"extra": [(["-5"], [])]},
    ),
    "NULL became empty string": ("UPDATE kinds SET note = '' WHERE id = 7", {"changed": [(["7"], ["note"])]}),
    "empty string became NULL": ("UPDATE kinds SET note = NULL WHERE id = 8", {"changed": [(["8"], ["note"])]}),
    "float precision (0.1 + 0.2 vs 0.3)": (
        "UPDATE kinds SET ratio = 0.1::float8 + 0.2::float8 WHERE id = 10",
        {"changed": [(["10"], ["ratio"])]},
    ),
    "timestamptz: same instant written under another TimeZone": (
        "SET TimeZone = 'Asia/Tokyo'; UPDATE kinds SET at = '2024-01-01 09:11:00' WHERE id = 11",
        {},
    ),
    "timestamptz: another instant": (
        "SET TimeZone = 'Asia/Tokyo'; UPDATE kinds SET at = '2024-01-01 00:11:00' WHERE id = 11",
        {"changed": [(["11"], ["at"])]},
    ),
    "jsonb: same object, keys in another order": (
        """UPDATE kinds SET doc = '{"b": "x", "a": 12}' WHERE id = 12""",
        {},
    ),
    "jsonb: another value": (
        """UPDATE kinds SET doc = '{"a": 12, "b": "y"}' WHERE id = 12""",
        {"changed": [(["12"], ["doc"])]},
    ),
    "numeric scale (13.0 vs 13.00)": (
        "UPDATE kinds SET amount = 13.00 WHERE id = 13",
        {"changed": [(["13"], ["amount"])]},
    ),
    "numeric: same value, same scale": ("UPDATE kinds SET amount = 13.0 WHERE id = 13", {}),
    "bytea": ("UPDATE kinds SET blob = blob || '\\x00'::bytea WHERE id = 14", {"changed": [(["14"], ["blob"])]}),
    "non-ASCII text": (
        "UPDATE kinds SET name = replace(name, 'ë', 'e') WHERE id = 15",
        {"changed": [(["15"], ["name"])]},
    ),
    "non-ASCII text: same letters, decomposed (NFD)": (
        "UPDATE kinds SET name = normalize(name, NFD) WHERE id = 16",
        {"changed": [(["16"], ["name"])]},
    ),
    "two columns of one row": (
        "UPDATE kinds SET label = 'other', ratio = -1 WHERE id = 2999",
        {"changed": [(["2999"], ["label", "ratio"])]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_injected_difference_is_found_and_named_and_nothing_else(fresh_dbs: tuple[str, str], case: str) -> None:
    # Given the same 3,000 rows of every column type on both sides
    src, tgt = fresh_dbs
    both(src, tgt, KINDS_SQL)
    change, expected = CASES[case]
    # When one row is changed on the target only, and the pair is validated
    run_sql(tgt, change)
    summary = check(src, tgt, [KINDS])
    # Then exactly that difference is reported (or none, for a change that keeps the value)
    assert listed(summary) == expected
    assert summary.differences == sum(len(v) for v in expected.values())
    assert summary.ok is (not expected)
    assert summary.rows_compared == 3000


def test_md5_row_hash_finds_the_same_differences(fresh_dbs: tuple[str, str]) -> None:
    # Given several differences at once, and the portable md5 row hash forced
    src, tgt = fresh_dbs
    both(src, tgt, KINDS_SQL)
    run_sql(
        tgt,
        "DELETE FROM kinds WHERE id = 1500; UPDATE kinds SET note = '' WHERE id = 7;"
        " UPDATE kinds SET amount = 13.00 WHERE id = 13; INSERT INTO kinds (id, label) VALUES (3001, 'new');"
        " SET TimeZone = 'Asia/Tokyo'; UPDATE kinds SET at = '2024-01-01 09:11:00' WHERE id = 11",
    )
    settings = SMALL.model_copy(update={"row_hash": "md5"})
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [KINDS], settings)
    summary = check(src, tgt, [KINDS], settings)
    # Then the plan used md5 and every difference is found, the same-instant timestamp not among them
    assert plan.tables[0].row_hash is RowHash.MD5
    assert listed(summary) == {
        "missing": [(["1500"], [])],
        "extra": [(["3001"], [])],
        "changed": [(["7"], ["note"]), (["13"], ["amount"])],
    }


def test_settings_that_change_the_text_form_are_pinned(fresh_dbs: tuple[str, str]) -> None:
    # Given the same rows, and a target database whose defaults print them differently
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE forms (id int PRIMARY KEY, at timestamptz, d date, i interval, f float8, b bytea, m money);"
        " INSERT INTO forms SELECT g, timestamptz '2024-03-01 12:00:00+00' + g * interval '1 hour',"
        " date '2024-01-01' + g, g * interval '90 minutes', g / 7.0, decode(md5(g::text), 'hex'), g * 1.25"
        " FROM generate_series(1, 500) g",
    )
    conn = connect(tgt)
    dbname = str(fetch_value(conn, "SELECT current_database()"))
    for setting, value in [
        ("TimeZone", "Pacific/Chatham"),
        ("DateStyle", "SQL, DMY"),
        ("IntervalStyle", "iso_8601"),
        ("extra_float_digits", "-3"),
        ("bytea_output", "escape"),
        ("lc_monetary", "C.UTF-8"),
    ]:
        execute(
            conn,
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(dbname), sql.Identifier(setting), sql.Literal(value)
            ),
        )
    conn.close()
    # (new sessions on the target now default to these: the check below would see them unpinned)
    probe = connect(tgt)
    assert fetch_value(probe, "SELECT timestamptz '2024-03-01 12:00:00+00'::text") != "2024-03-01 12:00:00+00"
    probe.close()
    # When validated / Then nothing differs
    summary = check(src, tgt, [TableName("public", "forms")])
    assert summary.ok and summary.rows_compared == 500, listed(summary)


# --- keys of every type ---------------------------------------------------------------------------

KEYED = {
    "uuid": (
        "CREATE TABLE keyed (k uuid PRIMARY KEY, v int);"
        " INSERT INTO keyed SELECT md5(g::text)::uuid, g FROM generate_series(1, 2000) g",
        "md5('77')::uuid",
        "'00000000-0000-0000-0000-000000000001'::uuid",
    ),
    "text, with tab, newline, backslash and quote in keys": (
        "CREATE TABLE keyed (k text PRIMARY KEY, v int);"
        " INSERT INTO keyed SELECT 'key ' || g, g FROM generate_series(1, 2000) g;"
        " INSERT INTO keyed VALUES (E'tab\\there', 1), (E'new\\nline', 2), (E'back\\\\slash', 3), ('quote''s', 4)",
        "E'tab\\there'",
        "E'new\\nline 2'",
    ),
    "composite (bigint, text)": (
        "CREATE TABLE keyed (a bigint, b text, v int, PRIMARY KEY (a, b));"
        " INSERT INTO keyed SELECT g / 3, 'b' || g % 3, g FROM generate_series(1, 2000) g",
        "(100, 'b0')",
        "(-1, 'zz')",
    ),
}


@pytest.mark.parametrize("key_type", list(KEYED))
def test_differences_are_named_by_keys_of_every_type(fresh_dbs: tuple[str, str], key_type: str) -> None:
    # Given a table with this kind of key on both sides
    src, tgt = fresh_dbs
    create, changed_key, extra_key = KEYED[key_type]
    both(src, tgt, create + "; ANALYZE keyed")
    columns = "(a, b)" if key_type.startswith("composite") else "k"
    # When the target changes one row and gains another
    run_sql(tgt, f"UPDATE keyed SET v = -v WHERE {columns} = {changed_key}")
    run_sql(tgt, f"INSERT INTO keyed ({columns.strip('()')}, v) SELECT {extra_key.strip('()')}, 0")
    summary = check(src, tgt, [TableName("public", "keyed")], Validation(chunk_rows=500, slice_rows=100))
    # Then both are reported by their keys' text, exactly as the database prints them
    conn = connect(src)
    expected_changed = list(
        fetch_value(
            conn,
            f"SELECT ARRAY[{columns.replace('(', '').replace(')', '')}]::text[] FROM keyed WHERE {columns} = {changed_key}",
        )
    )
    conn.close()
    found = listed(summary)
    assert found["changed"] == [(expected_changed, ["v"])]
    assert len(found["extra"]) == 1 and summary.differences == 2


def test_integer_keys_spanning_the_whole_bigint_range(fresh_dbs: tuple[str, str]) -> None:
    # Given bigint keys from the least to the greatest bigint, spread over the whole range
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE wide_keys (id bigint PRIMARY KEY, v int);"
        " INSERT INTO wide_keys SELECT g * 4611686018427387, g FROM generate_series(-1999, 1999) g;"
        " INSERT INTO wide_keys VALUES (-9223372036854775808, 0), (9223372036854775807, 0); ANALYZE wide_keys",
    )
    # When the target changes the row at each end and one in the middle, and gains one near the top
    run_sql(
        tgt, "UPDATE wide_keys SET v = -7 WHERE id IN (-9223372036854775808, 9223372036854775807, 4611686018427387)"
    )
    run_sql(tgt, "INSERT INTO wide_keys VALUES (9223372036854775806, 0)")
    summary = check(src, tgt, [TableName("public", "wide_keys")], Validation(chunk_rows=1_000, slice_rows=100))
    # Then exactly those are reported, and every row was compared
    assert listed(summary) == {
        "changed": [
            (["-9223372036854775808"], ["v"]),
            (["4611686018427387"], ["v"]),
            (["9223372036854775807"], ["v"]),
        ],
        "extra": [(["9223372036854775806"], [])],
    }
    assert summary.rows_compared == 4001 and summary.target_rows == 4002


@pytest.mark.parametrize("chunk_rows", [100_000, 500])
def test_keys_and_values_at_the_types_special_values_are_planned_and_compared_exactly(
    fresh_dbs: tuple[str, str], chunk_rows: int
) -> None:
    # Given keys at infinity, -infinity, NaN, +-Infinity and BC among ordinary ones, in one chunk or in many
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE ts_keyed (at timestamp PRIMARY KEY, v text);"
        " INSERT INTO ts_keyed SELECT '2020-01-01'::timestamp + g * interval '1 minute', 'r' FROM generate_series(1, 3000) g;"
        " INSERT INTO ts_keyed VALUES ('infinity', 'inf'), ('-infinity', 'ninf'), ('4713-01-01 BC', 'bc');"
        " CREATE TABLE num_keyed (n numeric PRIMARY KEY, v text);"
        " INSERT INTO num_keyed SELECT g / 7.0, 'r' FROM generate_series(1, 3000) g;"
        " INSERT INTO num_keyed VALUES ('NaN', 'nan'), ('Infinity', 'inf'), ('-Infinity', 'ninf');"
        " CREATE TABLE d_keyed (d date, k int, v float8, PRIMARY KEY (d, k));"
        " INSERT INTO d_keyed SELECT '2000-01-01'::date + g % 100, g, g / 3.0 FROM generate_series(1, 3000) g;"
        " INSERT INTO d_keyed VALUES ('infinity', 1, 'NaN'), ('-infinity', 1, '-Infinity');"
        " ANALYZE ts_keyed, num_keyed, d_keyed",
    )
    # When the target changes the rows at infinity and -infinity, loses the NaN row and changes an ordinary one
    run_sql(tgt, "UPDATE ts_keyed SET v = 'changed' WHERE at = 'infinity'")
    run_sql(tgt, "DELETE FROM num_keyed WHERE n = 'NaN'")
    run_sql(tgt, "UPDATE d_keyed SET v = 'Infinity' WHERE d = '-infinity'")
    run_sql(tgt, "UPDATE num_keyed SET v = 'x' WHERE n = 1")
    tables = [TableName("public", t) for t in ("ts_keyed", "num_keyed", "d_keyed")]
    summary = check(src, tgt, tables, Validation(chunk_rows=chunk_rows, slice_rows=100))
    # Then exactly those are named, by their keys' text, and every row was compared
    assert listed(summary) == {
        "changed": [(["-infinity", "1"], ["v"]), (["1.00000000000000000000"], ["v"]), (["infinity"], ["v"])],
        "missing": [(["NaN"], [])],
    }
    assert summary.rows_compared == 3 * 3000 + 3 + 3 + 2


def test_integer_columns_of_different_widths_are_compared_by_value(fresh_dbs: tuple[str, str]) -> None:
    # Given an integer column that is bigint on the target, and a numeric one that is text there
    src, tgt = fresh_dbs
    run_sql(src, "CREATE TABLE widths (id int PRIMARY KEY, n int, m numeric)")
    run_sql(tgt, "CREATE TABLE widths (id int PRIMARY KEY, n bigint, m text)")
    both(src, tgt, "INSERT INTO widths SELECT g, g * 7, g / 4.0 FROM generate_series(1, 2000) g; ANALYZE widths")
    # When one value changes in each
    run_sql(tgt, "UPDATE widths SET n = -1 WHERE id = 700; UPDATE widths SET m = '1.5' WHERE id = 6")
    summary = check(src, tgt, [TableName("public", "widths")])
    # Then equal values are equal across widths and kinds, and both changes are found
    assert listed(summary) == {"changed": [(["6"], ["m"]), (["700"], ["n"])]}
    assert summary.rows_compared == 2000
    assert summary.per_table[0].problems == [
        "column n is integer on the source, bigint on the target (compared by text form)",
        "column m is numeric on the source, text on the target (compared by text form)",
    ]


# --- bisection, multisets, schema ---------------------------------------------------------------


def test_a_range_far_larger_than_planned_is_bisected_down_to_rows(fresh_dbs: tuple[str, str]) -> None:
    # Given an empty source table (one slice planned) and 5,000 rows on the target
    src, tgt = fresh_dbs
    both(src, tgt, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    run_sql(tgt, "INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 5000) g")
    settings = Validation(chunk_rows=1_000, slice_rows=100, report_first_keys=5)
    # When the chunks are compared
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "big")], settings)
    results: list[ChunkResult] = run_chunks(src, tgt, plan.chunks, workers=1)
    summary = summarize(plan, results, finished_at=time.time())
    # Then the range was split (the target's keys as boundaries) and every extra row is counted,
    # the first ones listed in key order
    assert len(plan.chunks) == 1 and results[0].splits >= 1
    assert summary.extra == 5000 and summary.differences == 5000
    assert [k.key for k in summary.per_table[0].extra.first] == [["1"], ["2"], ["3"], ["4"], ["5"]]
    assert results[0].target_rows == 5000


def test_tables_without_primary_key_are_compared_as_multisets(fresh_dbs: tuple[str, str]) -> None:
    # Given a keyless table where the source holds a row twice, and an identical keyless table
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE bag (n int, s text); INSERT INTO bag SELECT g % 100, 's' || g % 100 FROM generate_series(1, 3000) g;"
        " CREATE TABLE same (n int); INSERT INTO same SELECT g FROM generate_series(1, 100) g",
    )
    run_sql(
        tgt, "DELETE FROM bag WHERE ctid = (SELECT min(ctid) FROM bag WHERE n = 7); INSERT INTO bag VALUES (500, 'new')"
    )
    # When validated
    summary = check(src, tgt, [TableName("public", "bag"), TableName("public", "same")])
    bag, same = summary.per_table
    # Then the bag reports one copy of (7,s7) missing and (500,new) extra, as a multiset; the other is equal
    assert bag.multiset and same.multiset and same.ok
    assert [(k.key, k.copies) for k in bag.missing.first] == [(["(7,s7)"], 1)]
    assert [(k.key, k.copies) for k in bag.extra.first] == [(["(500,new)"], 1)]
    assert (bag.missing.count, bag.extra.count, bag.source_rows, bag.target_rows) == (1, 1, 3000, 3000)


def test_schema_differences_are_problems(fresh_dbs: tuple[str, str]) -> None:
    # Given a table missing on the target, and one with a column the target lacks
    src, tgt = fresh_dbs
    run_sql(src, "CREATE TABLE only_here (id int PRIMARY KEY); CREATE TABLE wide (id int PRIMARY KEY, a int, b int)")
    run_sql(tgt, "CREATE TABLE wide (id int PRIMARY KEY, a int)")
    both(src, tgt, "INSERT INTO wide (id, a) SELECT g, g FROM generate_series(1, 10) g")
    # When validated
    summary = check(src, tgt, [TableName("public", "only_here"), TableName("public", "wide")])
    only_here, wide = summary.per_table
    # Then neither is ok; the shared columns of 'wide' were still compared (and are equal)
    assert not summary.ok
    assert only_here.problems == ["missing on the target"] and not only_here.compared
    assert wide.problems == ["columns only on the source (not compared, their data is not on the target): ['b']"]
    assert wide.differences == 0 and wide.source_rows == 10


# --- live logical replication with writes running ----------------------------------------------


FOREIGN_EVENT = "00000000-0000-4000-8000-000000000001"  # an events key gen_random_uuid() does not give here


def test_under_live_replication_only_real_differences_persist(fresh_dbs: tuple[str, str]) -> None:
    # Given the sample shop replicated by the logical engine while 2 clients keep writing
    src, tgt = fresh_dbs
    tables = [TableName.parse(t) for t in sample.SAMPLE_TABLES]
    both(src, tgt, sample.SCHEMA_SQL)
    conn = connect(src)
    sample.load_data(conn, 20_000)
    conn.close()
    names = ReplicationNames("zdm_val")
    engine = LogicalEngine(
        src,
        tgt,
        LogicalReplicationPlan(names, tuple(tables), LogicalSettings(copy_workers=2, copy_chunk_rows=5_000)),
    )
    engine.start()
    replication = Replication(subscription=names.subscription, slot=names.slot, timeout_seconds=30, attempts=5)
    settings = Validation(chunk_rows=2_000, slice_rows=500, report_first_keys=20)
    workload = Workload(src, clients=2, rate=150).start()
    try:
        time.sleep(1.0)
        # When validated while the writes run
        clean = check(src, tgt, tables, settings, replication=replication)
        # And then, with rows tampered with directly on the target (rows the workload never touches), one
        # of them an event the source never had (events, keyed by random uuids, is compared by bucket scans)
        run_sql(tgt, "UPDATE products SET name = 'tampered' WHERE id = 5")
        run_sql(tgt, "DELETE FROM order_items WHERE order_id = 1 AND line_no = 1")
        run_sql(tgt, f"INSERT INTO events (id, order_id, kind) VALUES ('{FOREIGN_EVENT}', 1, 'tampered')")
        tampered = check(src, tgt, tables, settings, replication=replication)
    finally:
        stats = workload.stop()
        engine.teardown()
    # Then identical data gave no persistent difference (in-flight ones only as transient)
    assert stats.committed > 50
    assert clean.differences == 0 and clean.unsettled == 0, listed(clean)
    assert clean.ok
    # And exactly the tampered rows persist
    assert listed(tampered) == {
        "missing": [(["1", "1"], [])],
        "extra": [([FOREIGN_EVENT], [])],
        "changed": [(["5"], ["name"])],
    }
    assert tampered.differences == 3 and tampered.unsettled == 0
    events = next(t for t in tampered.per_table if t.table == "public.events")
    assert any("buckets of its key" in note for note in events.notes)


def test_a_chunk_under_replication_notes_the_source_position_of_its_first_compare(fresh_dbs: tuple[str, str]) -> None:
    # Given a replicated table
    src, tgt = fresh_dbs
    both(src, tgt, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    run_sql(src, "INSERT INTO t SELECT g, g FROM generate_series(1, 1000) g")
    names = ReplicationNames("zdm_val2")
    engine = LogicalEngine(src, tgt, LogicalReplicationPlan(names, (TableName("public", "t"),), LogicalSettings()))
    engine.start()
    try:
        run_sql(tgt, "UPDATE t SET v = 0 WHERE id = 10")
        with SessionPair.open(src, tgt) as pair:
            plan = plan_validation(
                pair,
                [TableName("public", "t")],
                SMALL,
                replication=Replication(subscription=names.subscription, slot=names.slot),
            )
            before = str(fetch_value(pair.source, "SELECT pg_current_wal_insert_lsn()::text"))
        # When its chunks are compared
        results = run_chunks(src, tgt, plan.chunks, workers=1)
    finally:
        engine.teardown()
    # Then each chunk noted where the source was (at or after the plan), and the tampered row persists
    assert all(r.first_lsn is not None and Lsn.parse(r.first_lsn) >= Lsn.parse(before) for r in results)
    assert sum(r.changed.count for r in results) == 1


DENSE_KEYS = {
    # key columns, how a row number g becomes the key, the key's type(s)
    "bigint": ("id", "2 * g", "bigint"),
    "smallint": ("id", "(2 * g - 9000)::smallint", "smallint"),
    "text": ("id", "'k' || lpad((2 * g)::text, 6, '0')", "text"),
    "composite": ("a, b", "g % 7, 'k' || (2 * g)", "integer, text"),
    "uuid": ("id", "md5((2 * g)::text)::uuid", "uuid"),
    "integer and uuid": ("a, b", "g % 7, md5((2 * g)::text)::uuid", "integer, uuid"),
}


@pytest.mark.parametrize("key", list(DENSE_KEYS))
def test_dense_differences_are_all_found_reading_every_line(
    fresh_dbs: tuple[str, str], key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 6,000 rows where the target changed every 25th, lost every 97th and gained 40 rows
    src, tgt = fresh_dbs
    record_reads: list[str] = []
    read_records = queries.range_records
    monkeypatch.setattr(
        queries,
        "range_records",
        lambda spec, key_range: record_reads.append(spec.name) or read_records(spec, key_range),
    )
    columns, expression, types = DENSE_KEYS[key]
    names, type_list = columns.split(", "), types.split(", ")
    ddl = ", ".join(f"{n} {t}" for n, t in zip(names, type_list, strict=True))
    both(
        src,
        tgt,
        f"CREATE TABLE d ({ddl}, g int NOT NULL, v text, PRIMARY KEY ({columns}));"
        # In key order, as a table filled by its key is: key ranges then read pages in order.
        f" INSERT INTO d SELECT * FROM (SELECT {expression}, g, 'v' || g FROM generate_series(1, 6000) g) AS s"
        f" ORDER BY {', '.join(str(i + 1) for i in range(len(names)))}; ANALYZE d",
    )
    run_sql(
        tgt,
        "UPDATE d SET v = v || '!' WHERE g % 25 = 0 AND g % 97 <> 0; DELETE FROM d WHERE g % 97 = 0;"
        f" INSERT INTO d SELECT {expression.replace('2 * g', '2 * g * 150 + 1')}, -g, 'new'"
        " FROM generate_series(1, 40) g",
    )
    settings = Validation(chunk_rows=3_000, slice_rows=300, report_first_keys=1_000)
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "d")], settings)
    results = run_chunks(src, tgt, plan.chunks, workers=2)
    summary = summarize(plan, results, finished_at=time.time())
    # Then every difference is found and named, with the changed column
    conn = connect(src)
    try:
        key_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(n)) for n in names)

        def keys_where(condition: str) -> set[tuple[str, ...]]:
            rows = conn.cursor()
            rows.execute(sql.SQL("SELECT {} FROM d WHERE " + condition).format(key_text))
            return {tuple(r) for r in rows.fetchall()}

        changed, missing = keys_where("g % 25 = 0 AND g % 97 <> 0"), keys_where("g % 97 = 0")
    finally:
        conn.close()
    table = summary.per_table[0]
    assert {tuple(k.key) for k in table.changed.first} == changed
    assert {tuple(k.key) for k in table.missing.first} == missing
    assert table.extra.count == 40 and summary.extra == 40
    assert all(k.columns == ["v"] for k in table.changed.first)
    # And after the first slices (compared by ranges while density was unknown) every row was read once as a line
    assert summary.rows_compared == 6_000
    assert sum(r.rows_fetched for r in results) >= 0.8 * (6_000 + summary.target_rows)
    assert sum(r.slices for r in results) < 100  # ranges of 16 rows would be 375 and more
    # ... as binary records where every key column is an integer or a uuid, else as text lines
    assert bool(record_reads) == (key in ("bigint", "smallint", "uuid", "integer and uuid"))


def test_a_table_that_is_only_its_integer_key_is_compared_by_records(fresh_dbs: tuple[str, str]) -> None:
    # Given a table of nothing but a bigint key (records then carry a hash of no column), dense differences
    src, tgt = fresh_dbs
    both(src, tgt, "CREATE TABLE k (id bigint PRIMARY KEY); INSERT INTO k SELECT 2 * g FROM generate_series(1, 4000) g")
    run_sql(tgt, "DELETE FROM k WHERE id % 50 = 0; INSERT INTO k SELECT 2 * g + 1 FROM generate_series(1, 4000, 40) g")
    settings = Validation(chunk_rows=2_000, slice_rows=200, report_first_keys=1_000)
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "k")], settings)
    results = run_chunks(src, tgt, plan.chunks, workers=1)
    table = summarize(plan, results, finished_at=time.time()).per_table[0]
    # Then every missing and extra key is named, nothing is called changed, and rows were read as records
    assert {int(k.key[0]) for k in table.missing.first} == set(range(50, 8001, 50))
    assert {int(k.key[0]) for k in table.extra.first} == {2 * g + 1 for g in range(1, 4001, 40)}
    assert table.changed.count == 0
    assert sum(r.rows_fetched for r in results) >= 0.8 * (4_000 + table.target_rows)


def test_a_chunk_compared_by_key_ranges_tells_its_slices_then_its_differing_rows_as_it_goes(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given 4,000 rows in key order, 3 of them changed on the target
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE s (id bigint PRIMARY KEY, v text);"
        " INSERT INTO s SELECT g, 'v' || g FROM generate_series(1, 4000) g; ANALYZE s",
    )
    run_sql(tgt, "UPDATE s SET v = 'x' WHERE id IN (10, 2000, 3999)")
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "s")], Validation(chunk_rows=4_000, slice_rows=200))
    # When validated, hearing every step
    steps: list[ChunkStep] = []
    results = run_chunks(src, tgt, plan.chunks, workers=1, on_step=steps.append)
    # Then each chunk counted its slices from none to all, the first alone (density unknown), then the
    # differing rows it found were read in full
    assert len(plan.chunks) >= 1 and sum(r.changed.count for r in results) == 3
    for chunk, result in zip(plan.chunks, results, strict=True):
        mine = [s for s in steps if s.chunk == chunk.number]
        ranges = [s.done for s in mine if s.step == "key ranges"]
        assert ranges[:2] == [0, 1] and ranges == sorted(ranges)
        assert ranges[-1] == len(chunk.slice_ranges()) == mine[0].total and mine[0].unit == "slices"
        differing = [(s.done, s.total) for s in mine if s.step == "differing rows"]
        assert differing == ([(0, result.changed.count), (result.changed.count,) * 2] if result.changed.count else [])
        assert {s.step for s in mine} <= {"key ranges", "differing rows"}


def test_without_replication_what_changed_between_the_two_reads_is_settled_by_the_second(
    fresh_dbs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 1,000 rows; the target lacks 10, 20 and 30, has 1001 and 1002 too, and changed 500
    from lambdas.core.validation import chunk as chunk_module

    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE o (id bigint PRIMARY KEY, v text);"
        " INSERT INTO o SELECT g, 'v' || g FROM generate_series(1, 1000) g; ANALYZE o",
    )
    run_sql(tgt, "DELETE FROM o WHERE id IN (10, 20, 30); INSERT INTO o VALUES (1001, 'x'), (1002, 'y');")
    run_sql(tgt, "UPDATE o SET v = 'changed' WHERE id = 500")
    # ... and between the (key, hash) read and the rows read in full, a writer puts 10 back as it was,
    # 20 back with another value, and deletes 1001
    reads: list[tuple[str, list[int]]] = []
    diff_in_full = chunk_module._diff_in_full

    def writing_first(pair: SessionPair, spec: TableSpec, keys: Sequence[tuple[str, ...]], step: str, tally: object):
        if not reads:
            run_sql(tgt, "INSERT INTO o VALUES (10, 'v10'), (20, 'other'); DELETE FROM o WHERE id = 1001")
        reads.append((step, sorted(int(k[0]) for k in keys)))
        return diff_in_full(pair, spec, keys, step, tally)  # type: ignore[arg-type]

    monkeypatch.setattr(chunk_module, "_diff_in_full", writing_first)
    # When validated without replication
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "o")], Validation(chunk_rows=2_000, slice_rows=200))
    [result] = run_chunks(src, tgt, plan.chunks, workers=1)
    # Then the 6 differing keys were read again, in full
    assert reads == [("differing rows", [10, 20, 30, 500, 1001, 1002])]
    # ... what still differs is named: 30 missing, 1002 extra, 20 and 500 changed in v
    assert [k.key for k in result.missing.first] == [["30"]]
    assert [k.key for k in result.extra.first] == [["1002"]]
    assert sorted((k.key, k.columns) for k in result.changed.first) == [(["20"], ["v"]), (["500"], ["v"])]
    # ... and 10 (equal again) and 1001 (on neither side now) count as changed between the reads
    assert result.transient == 2


def md5_uuid(n: int) -> str:
    """md5(n::text)::uuid, as the server computes it."""
    return str(uuid.UUID(hashlib.md5(str(n).encode()).hexdigest()))


def md5_hex(n: int) -> str:
    return hashlib.md5(str(n).encode()).hexdigest()


# A key in no physical order: its type, row g's key (SQL), the 3 extra rows' keys (SQL of g in 1..3),
# row g's key as text, and the extra keys as text.
BUCKET_KEYS: dict[str, tuple[str, str, str, Callable[[int], str], set[str]]] = {
    "uuid": ("uuid", "md5(g::text)::uuid", "md5((-g)::text)::uuid", md5_uuid, {md5_uuid(-g) for g in (1, 2, 3)}),
    # buckets of a hash of the key, which are no key ranges
    "text": ("text", "md5(g::text)", "md5((-g)::text)", md5_hex, {md5_hex(-g) for g in (1, 2, 3)}),
    # a permutation of 0..20010; the extra keys lie below and above all others (in the open-ended end buckets)
    "bigint": (
        "bigint",
        "(g * 7919) % 20011",
        "CASE g WHEN 1 THEN -5 ELSE 20011 + g END",
        lambda g: str((g * 7919) % 20011),
        {"-5", "20013", "20014"},
    ),
}


def spy(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[str]:
    """Wrap a query builder: the list of table names it was called for."""
    calls: list[str] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda spec, *args: calls.append(spec.name) or real(spec, *args))
    return calls


def counting(frames: type[RecordFrames] | type[LineFrames], counter: list[int]) -> Callable[..., Frames]:
    """Frames in blocks of a few rows (64 bytes at least) that count their blocks in `counter`."""

    class Counted(frames):  # type: ignore[valid-type,misc]
        def _cut(self, rows: int) -> bytes:
            counter.append(1)
            return super()._cut(rows)

    return functools.partial(Counted, block_bytes=64)


def given_rows_in_no_order(src: str, tgt: str, key: str) -> None:
    """20,000 rows whose keys are in no physical order; the target lost 5 rows, changed 7 and gained 3."""
    key_type, key_of_g, extra_key_of_g, _, _ = BUCKET_KEYS[key]
    both(
        src,
        tgt,
        f"CREATE TABLE r (id {key_type} PRIMARY KEY, g int NOT NULL, v text, n numeric);"
        f" INSERT INTO r SELECT {key_of_g}, g, 'v' || g, g / 7.0 FROM generate_series(1, 20000) g; ANALYZE r",
    )
    run_sql(
        tgt,
        "DELETE FROM r WHERE g IN (1, 4000, 8000, 12000, 19999);"
        " UPDATE r SET v = v || '!' WHERE g IN (2, 3, 5000, 9000, 13000, 17000, 20000);"
        f" INSERT INTO r SELECT {extra_key_of_g}, -g, 'new', 0 FROM generate_series(1, 3) g",
    )


def assert_rows_in_no_order_named(summary: ValidationSummary, key: str) -> None:
    """Every difference `given_rows_in_no_order` made is named, and nothing else; every row counted once."""
    _, _, _, key_text, extra = BUCKET_KEYS[key]
    table = summary.per_table[0]
    assert {k.key[0] for k in table.missing.first} == {key_text(n) for n in (1, 4000, 8000, 12000, 19999)}
    assert {k.key[0] for k in table.changed.first} == {key_text(n) for n in (2, 3, 5000, 9000, 13000, 17000, 20000)}
    assert {k.key[0] for k in table.extra.first} == extra
    assert all(k.columns == ["v"] for k in table.changed.first)
    assert (summary.rows_compared, summary.target_rows) == (20_000, 19_998)


@pytest.mark.parametrize("key", list(BUCKET_KEYS))
@pytest.mark.parametrize("variant", ["fast row hash", "small blocks", "md5 row hash"])
def test_a_key_in_no_physical_order_is_compared_by_one_scan_in_key_buckets(
    fresh_dbs: tuple[str, str], key: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 20,000 rows whose keys are in no physical order, and a target that lost 5 rows, changed 7
    # and gained 3
    from lambdas.core.validation import chunk as chunk_module

    # the rows of differing buckets: binary records for a uuid or integer key, else text lines, sorted and streamed
    bucket_scans = spy(monkeypatch, queries, "bucket_lines" if key == "text" else "bucket_records")
    range_reads = spy(monkeypatch, queries, "range_lines" if key == "text" else "range_records")
    kinds: list[str] = []  # the kind of buckets the queries were built for
    bucket_of = queries.bucket_of
    monkeypatch.setattr(queries, "bucket_of", lambda spec, b: kinds.append(type(b).__name__) or bucket_of(spec, b))
    cut: list[int] = []
    if (
        variant == "small blocks"
    ):  # many blocks a side: the pipe read 100 bytes at a time, cut into blocks of a few rows
        frames = chunk_module.LineFrames if key == "text" else chunk_module.RecordFrames
        monkeypatch.setattr(chunk_module, frames.__name__, counting(frames, cut))
        monkeypatch.setattr(chunk_module, "CopyStream", functools.partial(CopyStream, read_bytes=100))
    src, tgt = fresh_dbs
    given_rows_in_no_order(src, tgt, key)
    row_hash = "md5" if variant == "md5 row hash" else "auto"
    settings = Validation(chunk_rows=2_000, slice_rows=200, report_first_keys=100, row_hash=row_hash)
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "r")], settings)
    steps: list[ChunkStep] = []
    results = run_chunks(src, tgt, plan.chunks, workers=2, on_step=steps.append)
    summary = summarize(plan, results, finished_at=time.time())
    # Then the table was one chunk, compared in (at most) 1,024 buckets of its key, and says so
    assert [(c.chunks, c.bucket_bits) for c in plan.chunks] == [(1, 10)]
    assert any("buckets of its key" in note for note in plan.tables[0].notes)
    assert 1_000 <= results[0].slices <= 1_024 and results[0].slices_mismatched <= 15
    # And every difference is named, and nothing else
    assert_rows_in_no_order_named(summary, key)
    # ... by one more scan, no key range read
    assert (len(bucket_scans), len(range_reads)) == (1, 0)
    if variant == "small blocks":  # each side's rows of up to 15 buckets, a few rows a block
        assert len(cut) >= 60
    # ... and the chunk told what it was doing as it went: the bucket scan, the rows streamed up to all
    # the source's rows in differing buckets, the 15 differing rows read in full
    assert list(dict.fromkeys(s.step for s in steps)) == ["key buckets", "rows of differing buckets", "differing rows"]
    streamed = [s for s in steps if s.step == "rows of differing buckets"]
    done = [s.done for s in streamed]
    assert done == sorted(done) and done[0] == 0 and done[-1] == streamed[0].total
    # (the target sent those rows but the 5 missing, and the 3 extra)
    assert done[-1] + (done[-1] - 5 + 3) == results[0].rows_fetched
    assert (steps[-1].done, steps[-1].total, steps[-1].unit) == (15, 15, "keys")
    if variant == "small blocks":
        assert len(set(done)) >= 10
    # ... in buckets of an integer's widths, of a uuid's leading bits under the md5 row hash (md5 of its
    # text would cost more), else of the key's hash
    expected = {"bigint": "IntegerWidths", "uuid": "UuidPrefixes" if row_hash == "md5" else "KeyHashes"}
    assert set(kinds) == {expected.get(key, "KeyHashes")}


@pytest.mark.parametrize("key", list(BUCKET_KEYS))
@pytest.mark.parametrize("dense", [True, False])
def test_a_sample_of_dense_differences_skips_the_bucket_scan_and_reads_every_row(
    fresh_dbs: tuple[str, str], key: str, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 20,000 rows in no order with 15 differences, and for dense ones 1 row in 25 changed as well;
    # the sample made 500 keys (a chunk then samples from 5,000 rows on)
    from lambdas.core.validation import chunk as chunk_module

    monkeypatch.setattr(chunk_module, "SAMPLE_KEYS", 500)
    bucket_scans = spy(monkeypatch, queries, "key_buckets")
    src, tgt = fresh_dbs
    given_rows_in_no_order(src, tgt, key)
    if dense:
        run_sql(tgt, "UPDATE r SET v = v || '?' WHERE g % 25 = 7")
    # When validated
    summary = check(src, tgt, [TableName("public", "r")], Validation(report_first_keys=5_000))
    # Then dense differences skipped the bucket scan, and the table says why; sparse ones did not
    table = summary.per_table[0]
    assert len(bucket_scans) == (0 if dense else 1)
    assert any("sampled rows differed: every row read at once" in n for n in table.notes) == dense
    # And every difference is named, and every row counted once
    _, _, _, key_text, extra = BUCKET_KEYS[key]
    changed = {2, 3, 5000, 9000, 13000, 17000, 20000} | (
        {g for g in range(1, 20001) if g % 25 == 7} if dense else set()
    )
    assert {k.key[0] for k in table.missing.first} == {key_text(n) for n in (1, 4000, 8000, 12000, 19999)}
    assert {k.key[0] for k in table.changed.first} == {key_text(n) for n in changed}
    assert {k.key[0] for k in table.extra.first} == extra and table.changed.count == len(changed)
    assert (summary.rows_compared, summary.target_rows) == (20_000, 19_998)


@pytest.mark.parametrize(
    ("key", "row_hash", "kind"),
    [
        ("uuid", "auto", "KeyHashes"),
        ("uuid", "md5", "UuidPrefixes"),  # groups of leading bits: key ranges
        ("text", "auto", "KeyHashes"),
        ("bigint", "auto", "KeyHashes"),  # not the integer's widths: they move with the least and greatest key
    ],
)
def test_a_table_too_large_for_one_scan_is_compared_in_groups_of_key_buckets_one_chunk_each(
    fresh_dbs: tuple[str, str], key: str, row_hash: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given rows in no physical order with differences, a scan process made to hash 6,000 rows in a task,
    # and one process a side
    kinds: list[str] = []
    bucket_of = queries.bucket_of
    monkeypatch.setattr(queries, "bucket_of", lambda spec, b: kinds.append(type(b).__name__) or bucket_of(spec, b))
    src, tgt = fresh_dbs
    given_rows_in_no_order(src, tgt, key)
    settings = Validation(
        chunk_rows=2_000,
        slice_rows=200,
        report_first_keys=100,
        row_hash=row_hash,
        bucket_scan_max_rows=6_000,
        max_parallel_chunks=1,
    )
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "r")], settings)
    results = run_chunks(src, tgt, plan.chunks, workers=2)
    summary = summarize(plan, results, finished_at=time.time())
    # Then the 20,000 rows were 4 groups of 1,024 buckets, one chunk each, and the plan says so
    assert [(c.bucket_bits, c.bucket_groups, c.bucket_group) for c in plan.chunks] == [(12, 4, g) for g in range(4)]
    assert any("4 chunks of one scan per side each in 4,096 buckets" in n for n in plan.tables[0].notes)
    assert [r.slices for r in results] == [1_024] * 4 and set(kinds) == {kind}
    # And each group held some of the rows and no row was in two (the total is the table's)
    assert all(r.source_rows > 1_000 for r in results) and sum(r.source_rows for r in results) == 20_000
    # And every difference is named, and nothing else
    assert_rows_in_no_order_named(summary, key)


@pytest.mark.parametrize("key", ["uuid", "bigint"])
def test_a_table_within_what_one_task_s_scan_processes_hash_is_one_chunk_of_all_its_buckets(
    fresh_dbs: tuple[str, str], key: str
) -> None:
    # Given the same 20,000 rows and 6,000 rows a scan process, but 4 processes a side
    src, tgt = fresh_dbs
    given_rows_in_no_order(src, tgt, key)
    settings = Validation(report_first_keys=100, bucket_scan_max_rows=6_000, max_parallel_chunks=4)
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [TableName("public", "r")], settings)
    results = run_chunks(src, tgt, plan.chunks, workers=2)
    summary = summarize(plan, results, finished_at=time.time())
    # Then one task scans the table once per side with the 4 processes, in 4,096 buckets (one scan
    # instead of 4), and every difference is named
    assert [(c.bucket_bits, c.bucket_groups, c.scan_workers) for c in plan.chunks] == [(12, 1, 4)]
    assert any("by one scan per side in 4,096 buckets" in n for n in plan.tables[0].notes)
    # (an integer's equal widths round the key span: a few buckets fewer)
    assert [r.source_rows for r in results] == [20_000] and 4_000 <= results[0].slices <= 4_096
    assert_rows_in_no_order_named(summary, key)


@pytest.mark.parametrize("key", ["uuid", "text"])
@pytest.mark.parametrize("groups", [1, 4])
def test_when_every_bucket_differs_every_row_is_read_with_no_bucket_computed(
    fresh_dbs: tuple[str, str], key: str, groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 3,000 rows keyed in no order, every one changed on the target, one missing and one extra (so
    # every bucket either side holds differs), in one chunk, or in 4 groups of buckets (one task's scan
    # made 1,000 rows)
    key_type, key_of_g, extra_key_of_g, key_text, _ = BUCKET_KEYS[key]
    reads: list[tuple[object, str]] = []
    read = queries.bucket_lines if key == "text" else queries.bucket_records

    def spied(spec: TableSpec, buckets: KeyBuckets, chosen: list[int] | None, group: Where) -> Where:
        reads.append((chosen, "true" if group == queries.EVERY_ROW else "group"))
        return read(spec, buckets, chosen, group)

    monkeypatch.setattr(queries, read.__name__, spied)
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        f"CREATE TABLE r (id {key_type} PRIMARY KEY, g int NOT NULL, v text);"
        f" INSERT INTO r SELECT {key_of_g}, g, 'v' || g FROM generate_series(1, 3000) g; ANALYZE r",
    )
    run_sql(
        tgt,
        "UPDATE r SET v = v || '!' WHERE g > 1; DELETE FROM r WHERE g = 1;"
        f" INSERT INTO r SELECT {extra_key_of_g}, 0, 'new' FROM generate_series(1, 1) g",
    )
    # When validated
    settings = Validation(
        report_first_keys=5_000, bucket_scan_max_rows=1_000 if groups > 1 else 100_000_000, max_parallel_chunks=1
    )
    summary = check(src, tgt, [TableName("public", "r")], settings)
    # Then every row (of each group) was read by one scan with no bucket filter, and every difference
    # is named once
    assert reads == ([(None, "true")] if groups == 1 else [(None, "group")] * groups)
    assert summary.chunks == groups
    table = summary.per_table[0]
    assert {k.key[0] for k in table.missing.first} == {key_text(1)}
    assert {k.key[0] for k in table.changed.first} == {key_text(g) for g in range(2, 3001)}
    assert table.extra.count == 1 and table.changed.count == 2_999


def test_a_composite_key_in_no_physical_order_is_compared_in_buckets_of_its_hash(fresh_dbs: tuple[str, str]) -> None:
    # Given (tenant, id) keys written in no order (tenants interleaved, as writes over time leave them),
    # and a target that lost 2 rows, changed 2 and gained 1
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE c (tenant text, id int, v text, PRIMARY KEY (tenant, id));"
        " INSERT INTO c SELECT 't' || (g % 7), g, 'v' || g FROM generate_series(1, 12000) g ORDER BY md5(g::text);"
        " ANALYZE c",
    )
    run_sql(
        tgt,
        "DELETE FROM c WHERE id IN (10, 7777); UPDATE c SET v = 'x' WHERE id IN (11, 11999);"
        " INSERT INTO c VALUES ('t9', 1, 'new')",
    )
    # When validated
    summary = check(src, tgt, [TableName("public", "c")], Validation(chunk_rows=2_000, slice_rows=200))
    # Then it was one chunk in buckets of its key's hash, and every difference is named, and nothing else
    assert summary.chunks == 1 and any("buckets of its key" in n for n in summary.per_table[0].notes)
    assert {kind: sorted(found) for kind, found in listed(summary).items()} == {
        "missing": [(["t0", "7777"], []), (["t3", "10"], [])],
        "changed": [(["t1", "11999"], ["v"]), (["t4", "11"], ["v"])],
        "extra": [(["t9", "1"], [])],
    }


def test_identical_tables_keyed_by_uuids_in_no_order_have_no_difference(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE r (id uuid PRIMARY KEY, v text);"
        " INSERT INTO r SELECT md5(g::text)::uuid, 'v' || g FROM generate_series(1, 5000) g; ANALYZE r",
    )
    summary = check(src, tgt, [TableName("public", "r")])
    assert summary.ok and summary.rows_compared == 5_000 and summary.differences == 0
    assert summary.chunks == 1


def test_a_multiset_too_large_to_list_reports_lower_bounds(
    fresh_dbs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a keyless table whose target lacks 30 rows and has one changed, and a small listing limit
    from lambdas.core.validation import chunk as chunk_module

    monkeypatch.setattr(chunk_module, "MULTISET_FETCH_LIMIT", 10)
    src, tgt = fresh_dbs
    both(src, tgt, "CREATE TABLE bag (n int); INSERT INTO bag SELECT g FROM generate_series(1, 3000) g")
    run_sql(tgt, "DELETE FROM bag WHERE n <= 30; UPDATE bag SET n = -n WHERE n = 500")
    # When validated
    summary = check(src, tgt, [TableName("public", "bag")])
    table = summary.per_table[0]
    # Then it is not equal, the counts are lower bounds (at least the source's 30 excess copies), and it says so
    assert not summary.ok
    assert table.missing.count >= 30 and not table.missing.first
    assert any("too many to list" in note for note in table.notes)


def test_identifiers_that_need_quoting_are_quoted_everywhere(fresh_dbs: tuple[str, str]) -> None:
    # Given a schema, table and columns whose names need quoting (space, quote, upper case, keyword)
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        'CREATE SCHEMA "My Schema"; CREATE TABLE "My Schema"."Odd ""Name"" t" ("Key Col" text, "select" int,'
        ' "n" int, PRIMARY KEY ("Key Col", "select"));'
        ' INSERT INTO "My Schema"."Odd ""Name"" t" SELECT \'k\' || g, g, g FROM generate_series(1, 1500) g;'
        ' CREATE TABLE "My Schema"."no key ""bag""" ("Value" text); INSERT INTO "My Schema"."no key ""bag""" VALUES (\'a\'), (\'b\')',
    )
    run_sql(tgt, 'UPDATE "My Schema"."Odd ""Name"" t" SET "n" = 0 WHERE "Key Col" = \'k700\'')
    run_sql(tgt, 'INSERT INTO "My Schema"."no key ""bag""" VALUES (\'c\')')
    # When validated (cut into several chunks and slices)
    odd, bag = TableName("My Schema", 'Odd "Name" t'), TableName("My Schema", 'no key "bag"')
    summary = check(src, tgt, [odd, bag], Validation(chunk_rows=500, slice_rows=100))
    # Then both differences are found by name
    assert listed(summary) == {"changed": [(["k700", "700"], ["n"])], "extra": [(["(c)"], [])]}


def test_a_partitioned_table_is_compared_through_its_root(fresh_dbs: tuple[str, str]) -> None:
    # Given a table partitioned by range, selected together with its partitions
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE m (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
        " CREATE TABLE m_low PARTITION OF m FOR VALUES FROM (0) TO (1000);"
        " CREATE TABLE m_high PARTITION OF m FOR VALUES FROM (1000) TO (3000);"
        " INSERT INTO m SELECT g, 'v' || g FROM generate_series(0, 2999) g",
    )
    run_sql(tgt, "UPDATE m SET v = 'x' WHERE id = 2500")
    tables = [TableName("public", n) for n in ("m", "m_high", "m_low")]
    # When validated
    summary = check(src, tgt, tables)
    # Then the root alone is compared (each row once) and the changed row is found
    assert [t.table for t in summary.per_table] == ["public.m"]
    assert summary.rows_compared == 3000
    assert listed(summary) == {"changed": [(["2500"], ["v"])]}


def test_plain_inheritance_children_are_compared_as_the_tables_they_are_each_row_once(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a parent with a child of its own (plain inheritance, as partitioning was done before
    # PostgreSQL 10), both selected: the copy moves each one's own rows (ONLY)
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE p (id int PRIMARY KEY, v text);"
        " CREATE TABLE c (PRIMARY KEY (id)) INHERITS (p);"
        " INSERT INTO p SELECT g, 'p' || g FROM generate_series(1, 100) g;"
        " INSERT INTO c SELECT g, 'c' || g FROM generate_series(101, 300) g",
    )
    run_sql(tgt, "UPDATE c SET v = 'x' WHERE id = 250")
    # When validated
    summary = check(src, tgt, [TableName("public", "p"), TableName("public", "c")])
    # Then each table is compared on its own rows (the parent's 100, the child's 200), and the changed
    # child row is reported once, in the child, not a second time through the parent
    rows = {t.table: (t.source_rows, t.target_rows) for t in summary.per_table}
    assert rows == {"public.p": (100, 100), "public.c": (200, 200)}
    assert summary.rows_compared == 300
    assert listed(summary) == {"changed": [(["250"], ["v"])]}


def test_a_serializable_database_default_puts_no_predicate_locks_on_the_applications_tables(
    fresh_dbs: tuple[str, str],
) -> None:
    # Given a source whose transactions default to SERIALIZABLE, and an application transaction
    # open meanwhile (its serializable snapshot keeps other transactions' predicate locks alive)
    src, tgt = fresh_dbs
    both(
        src,
        tgt,
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5000) g",
    )
    run_sql(src, f"ALTER DATABASE \"{parse_dsn(src)['dbname']}\" SET default_transaction_isolation = 'serializable'")
    app = connect(src, autocommit=False)
    try:
        execute(app, "SELECT 1")  # its snapshot is taken
        # When the validator compares t
        summary = check(src, tgt, [TableName("public", "t")])
        assert summary.ok
        # Then it left no SIRead (predicate) lock on t: under SSI those would make the application's
        # serializable transactions fail more often, and a validator has no need of them
        locks = query(src, "SELECT count(*) FROM pg_locks WHERE mode = 'SIReadLock' AND relation = 't'::regclass")
        assert locks == [(0,)]
    finally:
        app.close()


def test_a_table_the_role_may_not_read_is_a_problem_and_the_others_are_still_compared(
    pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]
) -> None:
    # Given two tables, a role that may read one of them on the source, and a difference in each
    src, tgt = fresh_dbs
    both(src, tgt, "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);"
         " INSERT INTO a SELECT generate_series(1, 100); INSERT INTO b SELECT generate_series(1, 100)")  # fmt: skip
    run_sql(tgt, "DELETE FROM a WHERE id = 7; DELETE FROM b WHERE id = 8")
    role = "zdm_reads_a"
    for server, dsn in zip(pg_pair, fresh_dbs, strict=True):
        server.psql(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")
        run_sql(dsn, f"GRANT SELECT ON a TO {role}" + (f"; GRANT SELECT ON b TO {role}" if dsn == tgt else ""))
    try:
        as_role = [
            server.dsn(parse_dsn(dsn)["dbname"], user=role) for server, dsn in zip(pg_pair, fresh_dbs, strict=True)
        ]
        # When validated as that role
        summary = check(as_role[0], as_role[1], [TableName("public", "a"), TableName("public", "b")])
    finally:
        for server, dsn in zip(pg_pair, fresh_dbs, strict=True):
            run_sql(dsn, f"DROP OWNED BY {role}")
            server.psql(f"DROP ROLE IF EXISTS {role}")
    # Then the unreadable table is a problem naming the grant (the validation fails), and the other is
    # still compared, its missing row found (before, the whole run stopped on "permission denied")
    tables = {t.table: t for t in summary.per_table}
    assert not summary.ok
    assert not tables["public.b"].compared
    assert tables["public.b"].problems == [
        "this role may not SELECT from it on the source; GRANT SELECT ON public.b TO the role there"
    ]
    assert [k.key for k in tables["public.a"].missing.first] == [["7"]]
