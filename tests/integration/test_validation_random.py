"""The validator against a brute-force comparison, on random tables in real PostgreSQL pairs.

Each seed builds one table on both servers: a random key (integer, bigint in or out of physical
order, uuid, text under C, the database's or an ICU collation, numeric, date, timestamptz, a
composite one, or none), random columns of many types, and values picked to trip a text form
(NULL against '', -0 against 0, 1.0 against 1.00, the same instant in another offset, jsonb key
order, '1 day' against '24 hours', non-ASCII text, bytea, arrays, integers whose 32-bit hash folds
alike). The target then loses rows, gains rows and has columns changed, at a rate from none to
half the table, so every path of the validator is taken (range aggregates and bisection, (key,
hash) lines and records, multisets). Settings are random too (chunk and slice sizes, md5 or the
fast hash, one or two workers).

The expected answer never comes from the injected changes: both tables are read in full, each
column as its text under pinned settings, and compared in Python. The validator must report
exactly that: the same missing, extra and changed keys, the same changed columns, the same
multiset rows and copies, and nothing else. A failure names its seed; `pytest -k 'seed_17'`
runs it again.

Under live logical replication, with a random writer on the source and rows tampered with on the
target where the writer never writes, the validator must report exactly what that comparison
finds once the writer has stopped and the target caught up: the tampered rows, nothing unsettled.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import pytest
from psycopg2 import sql
from psycopg2.extras import execute_values

from lambdas.core.config import LogicalSettings, Validation
from lambdas.core.db import Connection, connect, execute, fetch_all
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.lsn import current_lsn, wait_for_lsn
from lambdas.core.tables import TableName
from lambdas.core.validation import Replication, ValidationSummary, validate
from rehearsal.servers import PostgresServer
from tests.conftest import server_pair
from tests.integration.pg16_env import pg16_bindir

TABLE = TableName("public", "random_rows")
SEEDS = range(56)

Gen = Callable[[random.Random], str]


def _pick(*values: str) -> Gen:
    return lambda rng: rng.choice(values)


def _int_values(bits: int) -> Gen:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    edges = [0, 1, -1, low, high]
    if bits == 64:
        edges += [4294967297, 4294967296, -4294967297, 2**32 + 2**33]  # fold to the same 32 bits as 0 and others
    return lambda rng: str(rng.choice(edges) if rng.random() < 0.3 else rng.randint(low, high))


def _text(rng: random.Random) -> str:
    pieces = [
        "",
        "a",
        "A",
        "b",
        "B",
        "é",
        "e\u0301",
        "日本",
        "😀",
        "\t",
        "\n",
        "\\",
        '"',
        "'",
        ",",
        "(",
        ")",
        " ",
        "NULL",
        "z",
    ]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))


def _float(rng: random.Random) -> str:
    edges = ["0", "-0", "0.1", "0.3", "0.30000000000000004", "NaN", "Infinity", "-Infinity", "1e308", "5e-324"]
    return rng.choice(edges) if rng.random() < 0.4 else repr(rng.uniform(-1e6, 1e6))


def _timestamptz(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rng.choice(["infinity", "-infinity"])
    return _instant(rng)


def _instant(rng: random.Random) -> str:
    hour = rng.randint(0, 23)
    offset = rng.choice([0, 1, -5, 9])  # the same instant written in another zone has the same text under UTC
    return f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} {hour:02d}:{rng.randint(0, 59):02d}:0{rng.randint(0, 9)}.{rng.randint(0, 999999):06d}{offset:+03d}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


COLUMN_TYPES: dict[str, Gen] = {
    "integer": _int_values(32),
    "bigint": _int_values(64),
    "smallint": _int_values(16),
    "text": _text,
    "character varying(8)": lambda rng: _text(rng)[:8],
    "character(3)": _pick("", "a", "ab", "abc", "a b", "é"),
    "numeric": _pick("0", "0.0", "1", "1.0", "1.00", "-0.5", "NaN", "12345678901234567890.123456789", "1e-20"),
    "numeric(12,2)": lambda rng: f"{rng.uniform(-1e4, 1e4):.3f}",
    "double precision": _float,
    "real": _pick("0.1", "1.0000001", "-0", "3.4e38", "NaN"),
    "timestamp with time zone": _timestamptz,
    "timestamp without time zone": lambda rng: _timestamptz(rng)[:26],
    "date": _pick("2024-02-29", "2000-01-01", "infinity", "4713-01-01 BC", "1999-12-31"),
    "interval": _pick("1 day", "24 hours", "1 mon", "30 days", "-1 second", "0", "1 year 2 mons 3 days 04:05:06.789"),
    "jsonb": _pick(
        '{"a": 1, "b": 2}', '{"b": 2, "a": 1}', '{"a": 1.0}', '{"a": 1}', "[]", "null", '"é"', '{"a": [1, null]}'
    ),
    "json": _pick('{"a": 1, "b": 2}', '{"b": 2, "a": 1}', '{"a" :1}', "[]"),
    "bytea": _pick("\\x", "\\x00", "\\xdeadbeef", "\\x00ff", "\\x5c"),
    "boolean": _pick("true", "false"),
    "uuid": _uuid,
    "integer[]": _pick("{}", "{1,2,3}", "{1,NULL}", "{{1,2},{3,4}}", "{3,2,1}"),
    "text[]": _pick("{}", "{a,b}", '{"a,b",c}', "{NULL}", '{"NULL"}', '{""}'),
    "inet": _pick("10.0.0.1", "10.0.0.1/32", "10.0.0.0/8", "::1"),
    "money": _pick("1.00", "-3.50", "0"),
}


@dataclass(frozen=True)
class KeyKind:
    columns: tuple[tuple[str, str], ...]  # (name, type), in key order
    values: Callable[[random.Random], tuple[str, ...]]
    collation: str | None = None  # of a text key column
    physical_order: bool = False  # keys inserted in order (else shuffled)


def _serial(rng: random.Random) -> tuple[str, ...]:
    return (str(rng.randint(1, 10**6)),)


KEY_KINDS: dict[str, KeyKind] = {
    "bigint-ordered": KeyKind((("id", "bigint"),), _serial, physical_order=True),
    "bigint-scattered": KeyKind((("id", "bigint"),), lambda rng: (str(rng.randint(-(2**62), 2**62)),)),
    "integer": KeyKind((("id", "integer"),), lambda rng: (str(rng.randint(-(2**31), 2**31 - 1)),)),
    "smallint": KeyKind((("id", "smallint"),), lambda rng: (str(rng.randint(-(2**15), 2**15 - 1)),)),
    "uuid": KeyKind((("id", "uuid"),), lambda rng: (_uuid(rng),)),
    "text-C": KeyKind((("id", "text"),), lambda rng: (_text(rng) + str(rng.randint(0, 999)),), collation="C"),
    "text-default": KeyKind((("id", "text"),), lambda rng: (_text(rng) + str(rng.randint(0, 999)),)),
    "text-icu": KeyKind((("id", "text"),), lambda rng: (_text(rng) + str(rng.randint(0, 999)),), collation="und-x-icu"),
    "numeric": KeyKind((("id", "numeric(10,2)"),), lambda rng: (f"{rng.uniform(-1e5, 1e5):.2f}",)),
    "date": KeyKind(
        (("id", "date"),), lambda rng: (f"{rng.randint(1900, 2100)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",)
    ),
    "timestamptz": KeyKind((("id", "timestamp with time zone"),), lambda rng: (_instant(rng),)),
    "int-text": KeyKind(
        (("tenant", "integer"), ("name", "text")),
        lambda rng: (str(rng.randint(1, 5)), _text(rng) + str(rng.randint(0, 99))),
    ),
    "uuid-bigint": KeyKind(
        (("a", "uuid"), ("b", "bigint")),
        lambda rng: (str(uuid.UUID(int=rng.randint(0, 7) << 120)), str(rng.randint(1, 50))),
    ),
    "none": KeyKind((), lambda rng: ()),
}


@dataclass
class Case:
    seed: int
    key: str
    columns: list[tuple[str, str]]
    rows: int
    diff_rate: float
    clustered: bool  # the rows stored in the key's order on both sides (CLUSTER): compared by key ranges
    shuffled_target: bool  # the target's columns in another order than the source's
    dropped_on: str | None  # "source" or "target": that side's table has a dropped column
    settings: Validation
    workers: int

    def __str__(self) -> str:
        return (
            f"seed {self.seed}: key {self.key}, {self.rows} rows, diff rate {self.diff_rate}, "
            f"columns {[t for _, t in self.columns]}, clustered {self.clustered}, shuffled target "
            f"{self.shuffled_target}, dropped on {self.dropped_on}, chunk_rows {self.settings.chunk_rows}, "
            f"slice_rows {self.settings.slice_rows}, row_hash {self.settings.row_hash}, workers {self.workers}"
        )


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    key = list(KEY_KINDS)[seed % len(KEY_KINDS)]  # every key kind in turn, the rest at random
    types = rng.sample(sorted(COLUMN_TYPES), rng.randint(1, 6))
    if key == "none":
        types = types[:3]  # a multiset row is reported by its text, cut at 200 characters: kept shorter
    chunk_rows = rng.choice([100, 250, 1000, 100_000])
    # Each key kind in turn gets each size (and is stored in its key's order or not); the rest at random
    rows = [400, 3000, 1500, rng.choice([0, 1, 37, 2000])][(seed // len(KEY_KINDS)) % 4]
    return Case(
        seed=seed,
        key=key,
        columns=[(f"c{i}", t) for i, t in enumerate(types)],
        rows=rows,
        clustered=key != "none" and (seed // len(KEY_KINDS)) % 2 == 0,
        shuffled_target=rng.random() < 0.5,
        dropped_on=rng.choice([None, None, "source", "target"]),
        diff_rate=rng.choice([0.0, 0.002, 0.01, 0.05, 0.2, 0.5]),
        settings=Validation(
            chunk_rows=chunk_rows,
            slice_rows=min(chunk_rows, rng.choice([10, 20, 50, 200])),
            row_hash=rng.choice(["auto", "auto", "md5"]),
            report_first_keys=100_000,
        ),
        workers=rng.choice([1, 2]),
    )


# -- building the pair ------------------------------------------------------------------------------


def _create(dsn: str, case: Case, *, target: bool) -> None:
    """The table; on the target with its columns in another order when `shuffled_target`, and on one side
    with a dropped column ahead of the others when `dropped_on` names it."""
    kind = KEY_KINDS[case.key]
    defs: list[tuple[str, sql.Composable]] = []
    for name, type_name in kind.columns:
        collate = sql.SQL(" COLLATE {}").format(sql.Identifier(kind.collation)) if kind.collation else sql.SQL("")
        defs.append((name, sql.SQL("{} {} NOT NULL{}").format(sql.Identifier(name), sql.SQL(type_name), collate)))
    defs += [(n, sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))) for n, t in case.columns]
    if target and case.shuffled_target:
        random.Random(case.seed).shuffle(defs)
    dropped = case.dropped_on == ("target" if target else "source")
    columns = [sql.SQL("gone integer")] if dropped else []
    columns += [d for _, d in defs]
    if kind.columns:
        columns.append(
            sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(sql.Identifier(n) for n, _ in kind.columns))
        )
    conn = connect(dsn)
    try:
        execute(conn, sql.SQL("CREATE TABLE {} ({})").format(TABLE.ident, sql.SQL(", ").join(columns)))
        if dropped:
            execute(conn, sql.SQL("ALTER TABLE {} DROP COLUMN gone").format(TABLE.ident))
    finally:
        conn.close()


def _all_columns(case: Case) -> list[tuple[str, str]]:
    return [*KEY_KINDS[case.key].columns, *case.columns]


def _row(case: Case, rng: random.Random, key: tuple[str, ...]) -> tuple[str | None, ...]:
    values = [None if rng.random() < 0.1 else COLUMN_TYPES[t](rng) for _, t in case.columns]
    return (*key, *values)


def _insert(dsn: str, case: Case, rows: Sequence[tuple[str | None, ...]], *, clustered: bool) -> None:
    if not rows:
        return
    columns = _all_columns(case)
    template = sql.SQL("({})").format(sql.SQL(", ").join(sql.SQL("%s::" + t) for _, t in columns))
    statement = sql.SQL("INSERT INTO {} ({}) VALUES %s").format(
        TABLE.ident, sql.SQL(", ").join(sql.Identifier(n) for n, _ in columns)
    )
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            execute_values(cur, statement.as_string(conn), rows, template=template.as_string(conn), page_size=500)
        if clustered:
            execute(conn, sql.SQL("CLUSTER {} USING {}").format(TABLE.ident, sql.Identifier(f"{TABLE.name}_pkey")))
        execute(conn, sql.SQL("ANALYZE {}").format(TABLE.ident))
    finally:
        conn.close()


def build_pair(src: str, tgt: str, case: Case) -> None:
    """The same rows on both (the target's in another order), then the target changed at `diff_rate`."""
    rng = random.Random(case.seed * 7919 + 1)
    kind = KEY_KINDS[case.key]
    _create(src, case, target=False)
    _create(tgt, case, target=True)
    n = len(kind.columns)
    rows: list[tuple[str | None, ...]] = []
    if n:
        # Distinct keys by their canonical value (the server's), not the generator's text
        texts = {kind.values(rng) for _ in range(case.rows * 2 + 10)}
        keys = _canonical_keys(src, kind, sorted(texts))
        keys = rng.sample(keys, min(case.rows, len(keys)))
        if kind.physical_order:
            keys.sort(key=lambda k: int(k[0]))
        rows = [_row(case, rng, k) for k in keys]
    else:
        rows = [_row(case, rng, ()) for _ in range(case.rows)]
        rows += [rng.choice(rows) for _ in range(case.rows // 10)] if rows else []  # duplicate rows: copies count
    _insert(src, case, rows, clustered=case.clustered)
    target_rows = list(rows)
    if not kind.physical_order:
        rng.shuffle(target_rows)
    changes = round(len(rows) * case.diff_rate)
    deleted = set(rng.sample(range(len(target_rows)), min(len(target_rows), changes // 4)))
    changed = set(rng.sample(range(len(target_rows)), min(len(target_rows), changes // 2)))
    out: list[tuple[str | None, ...]] = []
    for i, row in enumerate(target_rows):
        if i in deleted:
            continue
        if i in changed:
            new = list(row)
            for c in rng.sample(range(n, len(row)), rng.randint(1, len(row) - n)):
                new[c] = None if rng.random() < 0.15 else COLUMN_TYPES[case.columns[c - n][1]](rng)
            row = tuple(new)
        out.append(row)
    extra = changes - len(deleted) - len(changed)
    if n:
        taken = {tuple(r[:n]) for r in rows}
        fresh = _canonical_keys(src, kind, sorted({kind.values(rng) for _ in range(extra * 3 + 3)}))
        out += [_row(case, rng, k) for k in fresh if k not in taken][:extra]
    else:
        out += [_row(case, rng, ()) for _ in range(extra)]
    _insert(tgt, case, out, clustered=case.clustered)


def _canonical_keys(dsn: str, kind: KeyKind, keys: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The keys as the server prints them (numeric(10,2) rounds, timestamptz normalizes), distinct, sorted."""
    if not keys:
        return []
    n = len(kind.columns)
    names = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(n))
    casts = sql.SQL(", ").join(
        sql.SQL("(u.{}::{})::text").format(sql.Identifier(f"k{i}"), sql.SQL(t)) for i, (_, t) in enumerate(kind.columns)
    )
    statement = sql.SQL("SELECT DISTINCT {casts} FROM unnest({arrays}) AS u({names})").format(
        casts=casts, arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(n)), names=names
    )
    conn = connect(dsn)
    try:
        execute(conn, "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'")
        return sorted(tuple(r) for r in fetch_all(conn, statement, [[k[i] for k in keys] for i in range(n)]))
    finally:
        conn.close()


# -- the brute-force answer ------------------------------------------------------------------------

PINNED = (
    "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';"
    " SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'"
)


def read_texts(dsn: str, case: Case) -> list[tuple[str | None, ...]]:
    """Every row, each column as its text form under pinned settings (character(n) with its padding)."""
    texts = []
    for name, type_name in _all_columns(case):
        ident = sql.Identifier(name)
        cast = "textin(bpcharout({}))" if type_name.startswith("character(") else "{}::text"
        texts.append(sql.SQL(cast).format(ident))
    conn = connect(dsn)
    try:
        execute(conn, PINNED)
        return fetch_all(conn, sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(texts), TABLE.ident))
    finally:
        conn.close()


@dataclass
class Answer:
    """What differs: keyed rows by key (changed ones with their columns), multiset rows with their copies."""

    missing: set[tuple[str, ...]] = field(default_factory=set)
    extra: set[tuple[str, ...]] = field(default_factory=set)
    changed: dict[tuple[str, ...], set[str]] = field(default_factory=dict)
    rows_missing: Counter[str] = field(default_factory=Counter)
    rows_extra: Counter[str] = field(default_factory=Counter)


def full_comparison(src: str, tgt: str, case: Case) -> Answer:
    n = len(KEY_KINDS[case.key].columns)
    if n == 0:
        source, target = Counter(read_row_texts(src, case)), Counter(read_row_texts(tgt, case))
        return Answer(rows_missing=source - target, rows_extra=target - source)
    by_key_s = {tuple(r[:n]): r[n:] for r in read_texts(src, case)}
    by_key_t = {tuple(r[:n]): r[n:] for r in read_texts(tgt, case)}
    names = [c for c, _ in case.columns]
    changed = {}
    for k in by_key_s.keys() & by_key_t.keys():
        columns = {names[i] for i, (a, b) in enumerate(zip(by_key_s[k], by_key_t[k], strict=True)) if a != b}
        if columns:
            changed[k] = columns
    return Answer(set(by_key_s) - set(by_key_t), set(by_key_t) - set(by_key_s), changed)


def read_row_texts(dsn: str, case: Case) -> list[str]:
    """Every row's text form as a whole, its columns in the source's order (a multiset table's rows are
    reported so)."""
    columns = sql.SQL(", ").join(sql.Identifier(n) for n, _ in _all_columns(case))
    conn = connect(dsn)
    try:
        execute(conn, PINNED)
        return [r[0] for r in fetch_all(conn, sql.SQL("SELECT ROW({})::text FROM {}").format(columns, TABLE.ident))]
    finally:
        conn.close()


def reported(summary: ValidationSummary) -> Answer:
    """The validator's answer, as `full_comparison` gives it; its counts checked against its lists."""
    (table,) = summary.per_table
    for kind in (table.missing, table.extra, table.changed):
        assert kind.count == sum(d.copies for d in kind.first), "a count disagrees with its list"
    if table.multiset:
        return Answer(
            rows_missing=Counter({d.key[0]: d.copies for d in table.missing.first}),
            rows_extra=Counter({d.key[0]: d.copies for d in table.extra.first}),
        )
    return Answer(
        {tuple(d.key) for d in table.missing.first},
        {tuple(d.key) for d in table.extra.first},
        {tuple(d.key): set(d.columns) for d in table.changed.first},
    )


@pytest.fixture(scope="module")
def pg15_and_16() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair("rand15-16", target_bindir=pg16_bindir()) as pair:
        yield pair


@contextmanager
def one_database(servers: tuple[PostgresServer, PostgresServer], name: str) -> Iterator[tuple[str, str]]:
    """A database of `name` on both servers for the module (creating one per case would take longer than the
    cases); dropped after."""
    for server in servers:
        server.create_database(name)
    try:
        yield servers[0].dsn(name), servers[1].dsn(name)
    finally:
        for server in servers:
            server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def module_dbs(pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[str, str]]:
    with one_database(pg_pair, "random_tables") as dsns:
        yield dsns


@pytest.fixture(scope="module")
def module_dbs_15_and_16(pg15_and_16: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[str, str]]:
    with one_database(pg15_and_16, "random_tables") as dsns:
        yield dsns


def without_the_table(dsns: tuple[str, str]) -> tuple[str, str]:
    """The pair, with the previous case's table dropped on both sides."""
    for dsn in dsns:
        conn = connect(dsn)
        try:
            execute(conn, sql.SQL("DROP TABLE IF EXISTS {}").format(TABLE.ident))
        finally:
            conn.close()
    return dsns


def check_case(src: str, tgt: str, case: Case) -> None:
    """Build the case's pair, validate it and hold the report against a full comparison."""
    build_pair(src, tgt, case)
    truth = full_comparison(src, tgt, case)
    summary = validate(src, tgt, [TABLE], case.settings, workers=case.workers)
    (table,) = summary.per_table
    assert table.problems == [] and summary.unsettled == 0, f"{case}: {table.problems}"
    assert reported(summary) == truth, str(case)
    assert summary.ok is (truth == Answer()), str(case)
    assert table.multiset is (case.key == "none")
    assert table.source_rows == len(read_row_texts(src, case)), str(case)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed_{s}")
def test_the_validator_reports_exactly_what_a_full_comparison_finds(module_dbs: tuple[str, str], seed: int) -> None:
    # Given a random table on both servers, the target's copy changed at random
    # When the validator compares them
    # Then it reports exactly what comparing every column of every row finds, and nothing else
    check_case(*without_the_table(module_dbs), make_case(seed))


@pytest.mark.parametrize("seed", range(14, 28), ids=lambda s: f"seed_{s}")
def test_across_postgresql_15_and_16_the_validator_reports_exactly_what_a_full_comparison_finds(
    module_dbs_15_and_16: tuple[str, str], seed: int
) -> None:
    # Given a random table on a PostgreSQL 15 source and a 16 target (one seed per key kind), changed at random
    case = make_case(seed)
    if KEY_KINDS[case.key].collation == "und-x-icu":
        case = replace(case, key="text-default")  # the PostgreSQL 16 build (pgserver) has no ICU
    # When validated, then exactly what a full comparison finds is reported
    check_case(*without_the_table(module_dbs_15_and_16), case)


# -- under live replication ----------------------------------------------------------------------------


def _insert_one(conn: Connection, case: Case, row: tuple[str | None, ...]) -> None:
    columns = _all_columns(case)
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        TABLE.ident,
        sql.SQL(", ").join(sql.Identifier(n) for n, _ in columns),
        sql.SQL(", ").join(sql.SQL("%s::" + t) for _, t in columns),
    )
    execute(conn, statement, list(row))


def _by_key(case: Case, key: tuple[str, ...]) -> tuple[sql.Composable, list[str]]:
    columns = KEY_KINDS[case.key].columns
    where = sql.SQL(" AND ").join(sql.SQL("{} = %s::" + t).format(sql.Identifier(n)) for n, t in columns)
    return where, list(key)


def _change(conn: Connection, case: Case, rng: random.Random, key: tuple[str, ...], *, delete: bool) -> None:
    """Delete the row, or set one of its columns to a random value (or NULL)."""
    where, params = _by_key(case, key)
    if delete:
        execute(conn, sql.SQL("DELETE FROM {} WHERE {}").format(TABLE.ident, where), params)
        return
    name, type_name = rng.choice(case.columns)
    value = None if rng.random() < 0.1 else COLUMN_TYPES[type_name](rng)
    statement = sql.SQL("UPDATE {} SET {} = %s::" + type_name + " WHERE {}").format(
        TABLE.ident, sql.Identifier(name), where
    )
    execute(conn, statement, [value, *params])


class RandomWriter(threading.Thread):
    """Inserts, updates and deletes on the source, one a transaction, on its own keys only, until stopped."""

    def __init__(self, dsn: str, case: Case, keys: list[tuple[str, ...]], fresh: list[tuple[str, ...]]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.case, self.keys, self.fresh = dsn, case, keys, fresh
        self.rng = random.Random(case.seed + 5)
        self.stopping = threading.Event()
        self.committed = 0
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            conn = connect(self.dsn)
            try:
                while not self.stopping.is_set():
                    roll = self.rng.random()
                    if roll < 0.15 and self.fresh:
                        key = self.fresh.pop()
                        _insert_one(conn, self.case, _row(self.case, self.rng, key))
                        self.keys.append(key)
                    elif self.keys:
                        delete = roll < 0.25
                        key = (
                            self.keys.pop(self.rng.randrange(len(self.keys))) if delete else self.rng.choice(self.keys)
                        )
                        _change(conn, self.case, self.rng, key, delete=delete)
                    self.committed += 1
                    time.sleep(0.003)
            finally:
                conn.close()
        except Exception as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("seed", [112, 116, 119, 137], ids=lambda s: f"seed_{s}")
def test_under_live_replication_only_what_persists_is_reported_exactly(fresh_dbs: tuple[str, str], seed: int) -> None:
    # Given a random keyed table replicated by the logical engine, rows tampered with directly on the target
    # (changed, deleted, added) where the source's writer never writes, and that writer running
    src, tgt = fresh_dbs
    case = make_case(seed)
    assert case.key != "none"
    rng = random.Random(seed + 99)
    kind = KEY_KINDS[case.key]
    _create(src, case, target=False)
    _create(tgt, case, target=True)
    keys = _canonical_keys(src, kind, sorted({kind.values(rng) for _ in range(case.rows * 3 + 30)}))
    rng.shuffle(keys)
    rows, rest = keys[: case.rows], keys[case.rows :]
    fresh, target_only = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    _insert(src, case, [_row(case, rng, k) for k in rows], clustered=case.clustered)
    names = ReplicationNames(f"zdm_live{seed}")
    plan = LogicalReplicationPlan(names, (TABLE,), LogicalSettings(copy_workers=2, copy_chunk_rows=1000))
    engine = LogicalEngine(src, tgt, plan)
    engine.start()
    try:
        written = rng.sample(rows, len(rows) // 2)
        untouched = sorted(set(rows) - set(written))
        target = connect(tgt)
        tampered = rng.sample(untouched, min(len(untouched), max(1, round(len(untouched) * case.diff_rate))))
        deleted = set(rng.sample(tampered, len(tampered) // 3))
        for key in tampered:
            _change(target, case, rng, key, delete=key in deleted)
        added = target_only[: len(tampered) // 3 + 1]
        for key in added:
            _insert_one(target, case, _row(case, rng, key))
        target.close()
        writer = RandomWriter(src, case, written, fresh)
        writer.start()
        time.sleep(0.5)
        # When the validator compares them while the writer runs
        replication = Replication(subscription=names.subscription, slot=names.slot, timeout_seconds=30, attempts=5)
        summary = validate(src, tgt, [TABLE], case.settings, workers=case.workers, replication=replication)
        writer.stopping.set()
        writer.join(10)
        assert writer.error is None and writer.committed > 100, writer.error
        source, target = connect(src), connect(tgt)
        wait_for_lsn(target, names.subscription, current_lsn(source), timeout=30, source=source, slot=names.slot)
        source.close()
        target.close()
        # Then it reports exactly what a full comparison finds once the writer stopped and the target caught
        # up (the tampered rows), nothing unsettled; the rows in flight only as transient
        truth = full_comparison(src, tgt, case)
        # (the copy and the replication left no other difference: only the tampered rows differ)
        assert (truth.missing, truth.extra) == (deleted, set(added)) and set(truth.changed) <= set(tampered)
        (table,) = summary.per_table
        assert table.problems == [] and summary.unsettled == 0, f"{case}: {table.problems} {table.unsettled}"
        assert reported(summary) == truth, str(case)
    finally:
        engine.teardown()
