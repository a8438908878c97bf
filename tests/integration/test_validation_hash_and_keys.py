"""The validator against values whose hashes once collided, keys it once could not range or order, and
blank padding it once dropped. Each case was a false "no difference", a crash or a hang."""

from __future__ import annotations

import itertools
import threading

import pytest

from lambdas.core.config import Validation
from lambdas.core.db import Connection, fetch_value
from lambdas.core.tables import TableName
from lambdas.core.validation import RowHash, SessionPair, plan_validation, validate
from lambdas.core.validation.session import run_with_settings
from tests.integration.db_env import run_sql

T = TableName("public", "t")
_names = itertools.count(1)


def listed(summary):  # type: ignore[no-untyped-def]
    out: dict[str, list] = {"missing": [], "extra": [], "changed": [], "unsettled": []}
    for table in summary.per_table:
        for kind in out:
            out[kind] += [
                (tuple(k.key), k.copies if table.multiset else tuple(k.columns)) for k in getattr(table, kind).first
            ]
    return {k: v for k, v in out.items() if v}


def check(src: str, tgt: str, mode: str = "auto"):  # type: ignore[no-untyped-def]
    settings = Validation(chunk_rows=1_000, slice_rows=200, report_first_keys=50, row_hash=mode)
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [T], settings)
    return plan, validate(src, tgt, [T], settings, workers=1)


# --- value hashes of bigint / timestamp fold 64 bits to 32: changed values once hashed alike ---------

FOLDED = {
    "bigint 0 -> 4294967297": (
        "CREATE TABLE t (id int PRIMARY KEY, v bigint); INSERT INTO t SELECT g, 0 FROM generate_series(1, 3000) g",
        "UPDATE t SET v = 4294967297 WHERE id = 1234",
        {"changed": [(("1234",), ("v",))]},
    ),
    "bigint -1 -> 4294967295": (
        "CREATE TABLE t (id int PRIMARY KEY, v bigint); INSERT INTO t SELECT g, -1 FROM generate_series(1, 3000) g",
        "UPDATE t SET v = 4294967295 WHERE id = 77",
        {"changed": [(("77",), ("v",))]},
    ),
    "timestamp + 4294967297 us": (
        "CREATE TABLE t (id int PRIMARY KEY, at timestamp);"
        " INSERT INTO t SELECT g, timestamp '2000-01-01' FROM generate_series(1, 3000) g",
        "UPDATE t SET at = timestamp '2000-01-01' + make_interval(secs => 4294.967297) WHERE id = 10",
        {"changed": [(("10",), ("at",))]},
    ),
    "timestamptz + 4294967297 us": (
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz);"
        " INSERT INTO t SELECT g, timestamptz '2000-01-01 00:00:00+00' FROM generate_series(1, 3000) g",
        "UPDATE t SET at = timestamptz '2000-01-01 00:00:00+00' + make_interval(secs => 4294.967297) WHERE id = 2999",
        {"changed": [(("2999",), ("at",))]},
    ),
    "multiset bigint 0 -> 4294967297": (
        "CREATE TABLE t (v bigint); INSERT INTO t SELECT 0 FROM generate_series(1, 30) g",
        "UPDATE t SET v = 4294967297 WHERE ctid = (SELECT min(ctid) FROM t)",
        {"missing": [(("(0)",), 1)], "extra": [(("(4294967297)",), 1)]},
    ),
}


@pytest.mark.parametrize("case", list(FOLDED))
def test_fast_value_hash_sees_every_changed_value(fresh_dbs: tuple[str, str], case: str) -> None:
    src, tgt = fresh_dbs
    ddl, change, expected = FOLDED[case]
    run_sql(src, ddl + "; ANALYZE t")
    run_sql(tgt, ddl + "; ANALYZE t")
    run_sql(tgt, change)
    plan, summary = check(src, tgt)
    assert plan.tables[0].row_hash is RowHash.FAST
    assert listed(summary) == expected
    assert not summary.ok


# --- an array-typed primary key (its range bounds once failed to parse) ----------------------------


def test_array_primary_key_is_compared(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    ddl = "CREATE TABLE t (k int[] PRIMARY KEY, v int); INSERT INTO t SELECT ARRAY[g, g + 1], g FROM generate_series(1, 3000) g; ANALYZE t"
    run_sql(src, ddl)
    run_sql(tgt, ddl)
    run_sql(tgt, "UPDATE t SET v = 0 WHERE k = ARRAY[5, 6]; INSERT INTO t VALUES (ARRAY[-1, 7], 1)")
    _, summary = check(src, tgt)
    assert listed(summary) == {"extra": [(("{-1,7}",), ())], "changed": [(("{5,6}",), ("v",))]}


# --- text keys collating differently on the two sides (once: target rows counted twice, endless bisection)


@pytest.fixture
def icu_target(pg_pair):  # type: ignore[no-untyped-def]
    """A source database (C.UTF-8) and a target database whose default collation is ICU en-US."""
    source, target = pg_pair
    name = f"coll{next(_names)}"
    source.psql(f'CREATE DATABASE "{name}" TEMPLATE template0')
    target.psql(
        f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    )
    yield source.dsn(name), target.dsn(name)
    for server in (source, target):
        server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def text_keys(rows: int) -> str:
    return (
        "CREATE TABLE t (k text PRIMARY KEY, v int);"
        " INSERT INTO t SELECT (ARRAY['a','B','_','Z','é','e','E','1','-',' '])[1 + g % 10]"
        " || (ARRAY['b','A','.','z'])[1 + (g / 10) % 4] || g, g"
        f" FROM generate_series(1, {rows}) g; ANALYZE t"
    )


def check_within(src: str, tgt: str, seconds: float):  # type: ignore[no-untyped-def]
    """check() on a daemon thread: None if it has not finished in time (the fixture's DROP DATABASE
    WITH FORCE then ends its sessions)."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(check(src, tgt)), daemon=True)
    worker.start()
    worker.join(seconds)
    return done[0] if done else None


def test_identical_text_keys_under_another_collation_finish_and_count_right(icu_target: tuple[str, str]) -> None:
    src, tgt = icu_target
    run_sql(src, text_keys(4000))
    run_sql(tgt, text_keys(4000))
    result = check_within(src, tgt, 60)  # 4,000 rows: well under a second when the collations agree
    # (once it never finished: mismatching ranges split at the target's quantiles, which the source
    # orders otherwise, down to depth 24 with up to 64 parts a level)
    assert result is not None, "validation of 4,000 identical rows did not finish in 60 s"
    _, summary = result
    assert summary.ok and listed(summary) == {}
    assert summary.rows_compared == summary.target_rows == 4000
    assert summary.per_table[0].multiset and "sorts under another collation" in summary.per_table[0].notes[0]


def test_identical_text_keys_under_another_collation_count_each_target_row_once(icu_target: tuple[str, str]) -> None:
    src, tgt = icu_target
    run_sql(src, text_keys(3000))
    run_sql(tgt, text_keys(3000))
    run_sql(tgt, "UPDATE t SET v = -1 WHERE k = 'Zb3'")
    result = check_within(src, tgt, 60)
    assert result is not None
    _, summary = result
    # the changed row is named (by key, or by its text form when compared as a multiset), nothing else
    found = listed(summary)
    assert found and all("Zb3" in str(entry) for entries in found.values() for entry in entries), found
    assert not summary.ok
    assert summary.rows_compared == summary.target_rows == 3000  # once: 4,100 target rows


# --- bpchar (no length) keeps trailing spaces, which ::text once dropped ------------------------------


@pytest.mark.parametrize("mode", ["auto", "md5"])
def test_trailing_spaces_in_unconstrained_bpchar_are_a_difference(fresh_dbs: tuple[str, str], mode: str) -> None:
    src, tgt = fresh_dbs
    ddl = "CREATE TABLE t (id int PRIMARY KEY, c bpchar); INSERT INTO t SELECT g, 'ab' FROM generate_series(1, 3000) g; ANALYZE t"
    run_sql(src, ddl)
    run_sql(tgt, ddl)
    run_sql(tgt, "UPDATE t SET c = 'ab   ' WHERE id = 9")  # a client reads 'ab   ' here, 'ab' on the source
    _, summary = check(src, tgt, mode)
    assert listed(summary) == {"changed": [(("9",), ("c",))]}


@pytest.mark.parametrize("mode", ["auto", "md5"])
def test_xml_is_compared_as_its_output_function_gives_it_without_a_default_declaration(
    fresh_dbs: tuple[str, str], mode: str
) -> None:
    # Given xml stored with its default declaration on the source, and without it on the target (as COPY,
    # pg_dump and every replication engine carry it: the output function leaves it out), and one real change
    src, tgt = fresh_dbs
    ddl = "CREATE TABLE t (id int PRIMARY KEY, x xml); ANALYZE t"
    run_sql(src, ddl)
    run_sql(tgt, ddl)
    run_sql(src, """INSERT INTO t SELECT g, '<?xml version="1.0"?><r/>' FROM generate_series(1, 3000) g""")
    run_sql(tgt, "INSERT INTO t SELECT g, '<r/>' FROM generate_series(1, 3000) g")
    run_sql(tgt, "UPDATE t SET x = '<r a=\"1\"/>' WHERE id = 9")
    # Then only the real change is a difference, with either row hash (a client reads '<r/>' on both sides)
    _, summary = check(src, tgt, mode)
    assert listed(summary) == {"changed": [(("9",), ("x",))]}


def test_bpchar_on_the_source_text_on_the_target_does_not_crash(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    run_sql(
        src,
        "CREATE TABLE t (id int PRIMARY KEY, c char(4)); INSERT INTO t SELECT g, 'ab' FROM generate_series(1, 300) g",
    )
    run_sql(
        tgt,
        "CREATE TABLE t (id int PRIMARY KEY, c text); INSERT INTO t SELECT g, 'ab  ' FROM generate_series(1, 300) g",
    )
    _, summary = check(src, tgt)
    assert listed(summary) == {} and summary.per_table[0].problems


# --- two tables whose 'schema.name' texts are the same ("public.a".b and public."a.b") -------------

NAMESAKES = [TableName("public", "a.b"), TableName("public.a", "b")]
NAMESAKE_B = (
    'CREATE SCHEMA "public.a"; CREATE TABLE "public.a".b (id int PRIMARY KEY, v text);'
    ' INSERT INTO "public.a".b SELECT g, g::text FROM generate_series(1, 100) g'
)
NAMESAKE_A = (
    'CREATE TABLE public."a.b" (id int PRIMARY KEY, v text); INSERT INTO public."a.b" SELECT g, g::text'
    " FROM generate_series(1, 100) g"
)
SMALL = Validation(chunk_rows=1_000, slice_rows=200, report_first_keys=50)


def test_a_table_missing_on_the_target_is_not_hidden_by_a_namesake(fresh_dbs: tuple[str, str]) -> None:
    # Given public."a.b" on the source only, and "public.a".b equal on both sides
    src, tgt = fresh_dbs
    run_sql(src, NAMESAKE_A)
    run_sql(src, NAMESAKE_B)
    run_sql(tgt, NAMESAKE_B)
    # When both are validated
    summary = validate(src, tgt, NAMESAKES, SMALL, workers=1)
    # Then both are reported, and the missing one fails the validation (once: one table, ok)
    assert summary.tables == 2 and not summary.ok
    assert sorted(t.table for t in summary.per_table) == ['"public.a".b', 'public."a.b"']


def test_a_difference_in_one_of_two_namesakes_is_reported(fresh_dbs: tuple[str, str]) -> None:
    # Given both tables on both sides, one row changed on the target in one of them
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        run_sql(dsn, NAMESAKE_A)
        run_sql(dsn, NAMESAKE_B)
    run_sql(tgt, "UPDATE \"public.a\".b SET v = 'tampered' WHERE id = 7")
    # When validated / Then exactly that row is named (once: its result was dropped as a duplicate chunk)
    summary = validate(src, tgt, NAMESAKES, SMALL, workers=1)
    assert summary.changed == 1 and not summary.ok


# --- a statement's own settings (a bucket scan's parallel query) ---------------------------------


@pytest.mark.parametrize("fails", [False, True])
def test_settings_for_one_statement_are_put_back_after_it(fresh_dbs: tuple[str, str], fails: bool) -> None:
    # Given a validator session (no parallel query, sorts allowed)
    src, tgt = fresh_dbs
    with SessionPair.open(src, tgt) as pair:
        settings = {"max_parallel_workers_per_gather": "3", "enable_sort": "off", "work_mem": "64MB"}
        names = list(settings)

        def current(conn: Connection) -> list[str]:
            return [str(fetch_value(conn, "SELECT current_setting(%s)", (n,))) for n in names]

        before = current(pair.source)

        def statement(conn: Connection) -> list[str]:
            seen = current(conn)
            if fails:
                raise RuntimeError("the statement failed")
            return seen

        # When a statement runs with its own settings (and succeeds or fails)
        if fails:
            with pytest.raises(RuntimeError):
                run_with_settings(settings, statement)(pair.source)
        else:
            assert run_with_settings(settings, statement)(pair.source) == ["3", "off", "64MB"]
        # Then the session has its own settings back, for the next chunk's statements
        assert current(pair.source) == before == ["0", "on", before[2]]
