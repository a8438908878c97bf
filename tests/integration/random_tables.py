"""Random tables for tests that need data a hand-written case would not think of: seeded generators of keys
(integer, bigint in or out of physical order, uuid, text under C, the database's or an ICU collation,
numeric, date, timestamptz, composite, none) and of columns of many types, with values picked to trip a
text form (NULL against '', -0 against 0, 1.0 against 1.00, the same instant in another offset, jsonb key
order, '1 day' against '24 hours', non-ASCII text, bytea, arrays, integers whose 32-bit hash folds alike);
building the same table on two servers; a random writer; and the brute-force answer: both tables read in
full, each column as its text under pinned settings, compared in Python."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from psycopg2 import sql
from psycopg2.extras import execute_values

from lambdas.core.config import Validation
from lambdas.core.db import Connection, connect, execute, fetch_all
from lambdas.core.tables import TableName

TABLE = TableName("public", "random_rows")

Gen = Callable[[random.Random], str]


def pick(*values: str) -> Gen:
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
    "character(3)": pick("", "a", "ab", "abc", "a b", "é"),
    "numeric": pick("0", "0.0", "1", "1.0", "1.00", "-0.5", "NaN", "12345678901234567890.123456789", "1e-20"),
    "numeric(12,2)": lambda rng: f"{rng.uniform(-1e4, 1e4):.3f}",
    "double precision": _float,
    "real": pick("0.1", "1.0000001", "-0", "3.4e38", "NaN"),
    "timestamp with time zone": _timestamptz,
    "timestamp without time zone": lambda rng: _timestamptz(rng)[:26],
    "date": pick("2024-02-29", "2000-01-01", "infinity", "4713-01-01 BC", "1999-12-31"),
    "interval": pick("1 day", "24 hours", "1 mon", "30 days", "-1 second", "0", "1 year 2 mons 3 days 04:05:06.789"),
    "jsonb": pick(
        '{"a": 1, "b": 2}', '{"b": 2, "a": 1}', '{"a": 1.0}', '{"a": 1}', "[]", "null", '"é"', '{"a": [1, null]}'
    ),
    "json": pick('{"a": 1, "b": 2}', '{"b": 2, "a": 1}', '{"a" :1}', "[]"),
    "bytea": pick("\\x", "\\x00", "\\xdeadbeef", "\\x00ff", "\\x5c"),
    "boolean": pick("true", "false"),
    "uuid": _uuid,
    "integer[]": pick("{}", "{1,2,3}", "{1,NULL}", "{{1,2},{3,4}}", "{3,2,1}"),
    "text[]": pick("{}", "{a,b}", '{"a,b",c}', "{NULL}", '{"NULL"}', '{""}'),
    "inet": pick("10.0.0.1", "10.0.0.1/32", "10.0.0.0/8", "::1"),
    "money": pick("1.00", "-3.50", "0"),
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
    values: Mapping[str, Gen] = field(default_factory=lambda: COLUMN_TYPES)  # each column type's generator

    def value(self, rng: random.Random, type_name: str, null_rate: float) -> str | None:
        return None if rng.random() < null_rate else self.values[type_name](rng)

    def __str__(self) -> str:
        return (
            f"seed {self.seed}: key {self.key}, {self.rows} rows, diff rate {self.diff_rate}, "
            f"columns {[t for _, t in self.columns]}, clustered {self.clustered}, shuffled target "
            f"{self.shuffled_target}, dropped on {self.dropped_on}, chunk_rows {self.settings.chunk_rows}, "
            f"slice_rows {self.settings.slice_rows}, row_hash {self.settings.row_hash}, workers {self.workers}"
        )


def make_case(seed: int, pool: Mapping[str, Gen] = COLUMN_TYPES) -> Case:
    """The seed's case, its columns' types and values from `pool`."""
    rng = random.Random(seed)
    key = list(KEY_KINDS)[seed % len(KEY_KINDS)]  # every key kind in turn, the rest at random
    types = rng.sample(sorted(pool), rng.randint(1, 6))
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
        values=pool,
    )


# -- building the pair ------------------------------------------------------------------------------


def create_table(dsn: str, case: Case, *, target: bool) -> None:
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


def all_columns(case: Case) -> list[tuple[str, str]]:
    return [*KEY_KINDS[case.key].columns, *case.columns]


def random_row(case: Case, rng: random.Random, key: tuple[str, ...]) -> tuple[str | None, ...]:
    values = [case.value(rng, t, 0.1) for _, t in case.columns]
    return (*key, *values)


def insert_rows(dsn: str, case: Case, rows: Sequence[tuple[str | None, ...]], *, clustered: bool) -> None:
    if not rows:
        return
    columns = all_columns(case)
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
    create_table(src, case, target=False)
    create_table(tgt, case, target=True)
    n = len(kind.columns)
    rows: list[tuple[str | None, ...]] = []
    if n:
        # Distinct keys by their canonical value (the server's), not the generator's text
        texts = {kind.values(rng) for _ in range(case.rows * 2 + 10)}
        keys = canonical_keys(src, kind, sorted(texts))
        keys = rng.sample(keys, min(case.rows, len(keys)))
        if kind.physical_order:
            keys.sort(key=lambda k: int(k[0]))
        rows = [random_row(case, rng, k) for k in keys]
    else:
        rows = [random_row(case, rng, ()) for _ in range(case.rows)]
        rows += [rng.choice(rows) for _ in range(case.rows // 10)] if rows else []  # duplicate rows: copies count
    insert_rows(src, case, rows, clustered=case.clustered)
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
                new[c] = case.value(rng, case.columns[c - n][1], 0.15)
            row = tuple(new)
        out.append(row)
    extra = changes - len(deleted) - len(changed)
    if n:
        taken = {tuple(r[:n]) for r in rows}
        fresh = canonical_keys(src, kind, sorted({kind.values(rng) for _ in range(extra * 3 + 3)}))
        out += [random_row(case, rng, k) for k in fresh if k not in taken][:extra]
    else:
        out += [random_row(case, rng, ()) for _ in range(extra)]
    insert_rows(tgt, case, out, clustered=case.clustered)


def canonical_keys(dsn: str, kind: KeyKind, keys: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
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
    for name, type_name in all_columns(case):
        ident = sql.Identifier(name)
        # as a client reads them (the output function): ::text keeps xml's default declaration, drops bpchar's spaces
        cast = "textin(bpcharout({}))" if type_name.startswith("character(") else "{}::text"
        cast = "textin(xml_out({}))" if type_name == "xml" else cast
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
    columns = sql.SQL(", ").join(sql.Identifier(n) for n, _ in all_columns(case))
    conn = connect(dsn)
    try:
        execute(conn, PINNED)
        return [r[0] for r in fetch_all(conn, sql.SQL("SELECT ROW({})::text FROM {}").format(columns, TABLE.ident))]
    finally:
        conn.close()


# -- changes on one side ----------------------------------------------------------------------------


def insert_row(conn: Connection, case: Case, row: tuple[str | None, ...]) -> None:
    columns = all_columns(case)
    statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        TABLE.ident,
        sql.SQL(", ").join(sql.Identifier(n) for n, _ in columns),
        sql.SQL(", ").join(sql.SQL("%s::" + t) for _, t in columns),
    )
    execute(conn, statement, list(row))


def by_key(case: Case, key: tuple[str, ...]) -> tuple[sql.Composable, list[str]]:
    columns = KEY_KINDS[case.key].columns
    where = sql.SQL(" AND ").join(sql.SQL("{} = %s::" + t).format(sql.Identifier(n)) for n, t in columns)
    return where, list(key)


def change_row(conn: Connection, case: Case, rng: random.Random, key: tuple[str, ...], *, delete: bool) -> None:
    """Delete the row, or set one of its columns to a random value (or NULL)."""
    where, params = by_key(case, key)
    if delete:
        execute(conn, sql.SQL("DELETE FROM {} WHERE {}").format(TABLE.ident, where), params)
        return
    name, type_name = rng.choice(case.columns)
    value = case.value(rng, type_name, 0.1)
    statement = sql.SQL("UPDATE {} SET {} = %s::" + type_name + " WHERE {}").format(
        TABLE.ident, sql.Identifier(name), where
    )
    execute(conn, statement, [value, *params])


def move_row(conn: Connection, case: Case, old: tuple[str, ...], new: tuple[str, ...]) -> None:
    """Change a row's key (every key column) from `old` to `new`."""
    where, params = by_key(case, old)
    columns = KEY_KINDS[case.key].columns
    sets = sql.SQL(", ").join(sql.SQL("{} = %s::" + t).format(sql.Identifier(n)) for n, t in columns)
    execute(conn, sql.SQL("UPDATE {} SET {} WHERE {}").format(TABLE.ident, sets, where), [*new, *params])


class RandomWriter(threading.Thread):
    """Inserts, updates and deletes on the source (and, with `moves`, key changes), one a transaction, on its own
    keys only, until stopped."""

    def __init__(
        self, dsn: str, case: Case, keys: list[tuple[str, ...]], fresh: list[tuple[str, ...]], *, moves: bool = False
    ) -> None:
        super().__init__(daemon=True)
        self.dsn, self.case, self.keys, self.fresh, self.moves = dsn, case, keys, fresh, moves
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
                    if self.moves and roll < 0.1 and self.keys and self.fresh:
                        new = self.fresh.pop()
                        move_row(conn, self.case, self.keys.pop(self.rng.randrange(len(self.keys))), new)
                        self.keys.append(new)
                    elif roll < 0.15 and self.fresh:
                        key = self.fresh.pop()
                        insert_row(conn, self.case, random_row(self.case, self.rng, key))
                        self.keys.append(key)
                    elif self.keys:
                        delete = roll < 0.25
                        key = (
                            self.keys.pop(self.rng.randrange(len(self.keys))) if delete else self.rng.choice(self.keys)
                        )
                        change_row(conn, self.case, self.rng, key, delete=delete)
                    self.committed += 1
                    time.sleep(0.003)
            finally:
                conn.close()
        except Exception as exc:  # reported by the test
            self.error = exc
