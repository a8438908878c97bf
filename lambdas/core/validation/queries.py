"""The validator's SQL, built with psycopg2.sql: identifiers quoted, every value a parameter.

Type names in casts (`%s::bigint`) come from the catalog's format_type(), as in
`ranges.range_predicate`; nothing a user typed is ever spliced into SQL text.

A row's hash is a bigint computed inside the database from the text form of each compared
column (in the source's column order, so the two sides' physical column orders do not matter):
- `hashtextextended` (RowHash.FAST): each column's text hashed with its position as the seed
  (a NULL gives a fixed per-column value) and the column hashes XORed. About 35% cheaper than
  hashing the whole ROW(...)::text (record_out's quoting costs as much as the columns' output).
  Chosen only when both servers were seen to give the same hashes with the same encoding.
- md5 (RowHash.MD5): the first 64 bits of md5 of ROW(c1, c2, ...)::text as UTF-8 bytes, the
  same on any server, encoding and version.
Every text is hashed under COLLATE "C", so a nondeterministic collation cannot make 'A' and
'a' hash alike. A range's aggregate is count(*) and the exact (numeric) sum of the row hashes:
order-independent, and unlike XOR it does not cancel duplicate rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2 import sql

from lambdas.core.ranges import KeyRange, range_predicate
from lambdas.core.validation.model import Key, RowHash, TableSpec

Params = list[Any]


def table_ident(spec: TableSpec) -> sql.Composable:
    return sql.Identifier(spec.schema_name, spec.name)


def row_text(spec: TableSpec, alias: str = "t") -> sql.Composable:
    cols = sql.SQL(", ").join(sql.Identifier(alias, c) for c in spec.column_names)
    return sql.SQL("ROW({})::text").format(cols)


def hash_of(text: sql.Composable, row_hash: RowHash) -> sql.Composable:
    """The md5 form of a text's 64-bit hash (multiset buckets and the md5 row hash)."""
    if row_hash is RowHash.FAST:
        return sql.SQL('hashtextextended({} COLLATE "C", 0)').format(text)
    return sql.SQL("('x' || left(md5(convert_to({}, 'UTF8')), 16))::bit(64)::bigint").format(text)


def row_hash(spec: TableSpec, alias: str = "t") -> sql.Composable:
    """The row's 64-bit hash (see the module docstring)."""
    if spec.row_hash is RowHash.MD5 or not spec.columns:
        return hash_of(row_text(spec, alias), spec.row_hash)
    parts = [
        sql.SQL('coalesce(hashtextextended({c}::text COLLATE "C", {seed}), {null})').format(
            c=sql.Identifier(alias, column.name), seed=sql.Literal(i), null=sql.Literal(-i)
        )
        for i, column in enumerate(spec.columns, start=1)
    ]
    return sql.SQL("({})").format(sql.SQL(" # ").join(parts))


def _key_texts(spec: TableSpec, alias: str = "t") -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(alias, k)) for k in spec.key)


def _key_order(spec: TableSpec, alias: str = "t") -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, k) for k in spec.key)


def _where(spec: TableSpec, key_range: KeyRange) -> tuple[sql.Composable, Params]:
    predicate, params = range_predicate(spec.key, spec.key_types, key_range)
    return predicate, list(params)


def aggregate(spec: TableSpec, key_range: KeyRange) -> tuple[sql.Composable, Params]:
    """count(*) and the sum of row hashes of one key range (the text of the exact sum)."""
    where, params = _where(spec, key_range)
    query = sql.SQL("SELECT count(*), coalesce(sum({h}), 0)::text FROM {t} AS t WHERE {where}").format(
        h=row_hash(spec), t=table_ident(spec), where=where
    )
    return query, params


# Key types whose text form never holds a backslash, tab or newline (no escaping needed).
_PLAIN_KEY_TYPES = {"smallint", "integer", "bigint", "uuid", "numeric", "date", "boolean", "oid"}


def _key_line_parts(spec: TableSpec) -> list[sql.Composable]:
    """Each key column's text, with backslash, tab and newline escaped as COPY does (`rowdiff.unescape_copy`)."""
    parts: list[sql.Composable] = []
    for column, type_name in zip(spec.key, spec.key_types, strict=True):
        text = sql.SQL("{}::text").format(sql.Identifier("t", column))
        if type_name.split("(")[0] not in _PLAIN_KEY_TYPES:
            text = sql.SQL(r"replace(replace(replace({}, E'\\', E'\\\\'), E'\t', E'\\t'), E'\n', E'\\n')").format(text)
        parts.append(text)
    return parts


def hash_lines(spec: TableSpec, key_range: KeyRange, limit: int | None = None) -> tuple[sql.Composable, Params]:
    """One row: the count and every row's `key<TAB>...<TAB>hash` line, newline-separated (`rowdiff.diff_hash_lines`).

    One aggregated value instead of a row per key: the client receives a single string and
    splits it in C, instead of a Python call per row. No ORDER BY (that would sort): both sides
    read the range through the same index, so equal ranges give byte-equal strings (the cheap
    path); a different order still diffs correctly as sets. With `limit`, at most that many rows.
    """
    where, params = _where(spec, key_range)
    line = sql.SQL(r" || E'\t' || ").join([*_key_line_parts(spec), sql.SQL("{}::text").format(row_hash(spec))])
    inner = sql.SQL("SELECT {line} AS line FROM {t} AS t WHERE {where}").format(
        line=line, t=table_ident(spec), where=where
    )
    if limit is not None:
        inner = sql.SQL("{} LIMIT %s").format(inner)
        params.append(limit)
    return sql.SQL(r"SELECT count(*), coalesce(string_agg(s.line, E'\n'), '') FROM ({}) AS s").format(inner), params


def quantiles(spec: TableSpec, key_range: KeyRange, step: int) -> tuple[sql.Composable, Params]:
    """Every `step`-th key of the range in key order, as text: boundaries that cut it into even parts.

    Reads only the key (an index-only scan where the visibility map allows). The subquery's
    columns are renamed positionally, so no table column name can collide with the row number.
    """
    where, params = _where(spec, key_range)
    aliases = [sql.Identifier(f"k{i}") for i in range(len(spec.key))]
    query = sql.SQL(
        "SELECT {outer} FROM (SELECT {keys}, row_number() OVER (ORDER BY {order}) FROM {t} AS t WHERE {where})"
        " AS s({aliases}, n) WHERE mod(s.n, %s) = 0 ORDER BY s.n"
    ).format(
        outer=sql.SQL(", ").join(sql.SQL("s.{}").format(a) for a in aliases),
        keys=_key_texts(spec),
        order=_key_order(spec),
        t=table_ident(spec),
        where=where,
        aliases=sql.SQL(", ").join(aliases),
    )
    return query, [*params, step]


def fetch_rows(spec: TableSpec, keys: Sequence[Key], *, with_version: bool) -> tuple[sql.Composable, Params]:
    """Every compared column's text form for the given keys, one output row per key, in key order.

    Columns: the key's position in `keys` (1-based), whether the row exists, its xmin (when
    `with_version`; it changes with every update), then the columns. Keys travel as one text
    array per key column, joined through unnest and cast to the key's types.
    """
    n = len(spec.key)
    u_cols = [sql.Identifier(f"k{i}") for i in range(n)]
    casts = [sql.SQL("u.{}::{}").format(c, sql.SQL(t)) for c, t in zip(u_cols, spec.key_types, strict=True)]
    values = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c)) for c in spec.column_names)
    version = sql.SQL("t.xmin::text") if with_version else sql.SQL("NULL::text")
    query = sql.SQL(
        "SELECT u.ord, t.{first} IS NOT NULL, {version}{sep}{values}"
        " FROM unnest({arrays}) WITH ORDINALITY AS u({u_cols}, ord)"
        " LEFT JOIN {t} AS t ON ({t_keys}) = ({casts}) ORDER BY {casts}"
    ).format(
        first=sql.Identifier(spec.key[0]),
        version=version,
        sep=sql.SQL(", ") if spec.column_names else sql.SQL(""),
        values=values,
        arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(n)),
        u_cols=sql.SQL(", ").join(u_cols),
        t=table_ident(spec),
        t_keys=_key_order(spec),
        casts=sql.SQL(", ").join(casts),
    )
    return query, [[k[i] for k in keys] for i in range(n)]


# -- multisets (no primary key) --------------------------------------------------------------


def whole_aggregate(spec: TableSpec) -> tuple[sql.Composable, Params]:
    query = sql.SQL("SELECT count(*), coalesce(sum({h}), 0)::text FROM {t} AS t").format(
        h=row_hash(spec), t=table_ident(spec)
    )
    return query, []


def bucket_aggregates(spec: TableSpec, bits: int) -> tuple[sql.Composable, Params]:
    """count and hash sum per bucket, a bucket being the top `bits` bits of the row hash.

    OFFSET 0 keeps the subquery from being flattened, so each row's hash is computed once.
    """
    query = sql.SQL(
        "SELECT (s.h >> %s)::integer, count(*), sum(s.h)::text FROM (SELECT {h} AS h FROM {t} AS t OFFSET 0) AS s"
        " GROUP BY 1"
    ).format(h=row_hash(spec), t=table_ident(spec))
    return query, [64 - bits]


def bucket_rows(spec: TableSpec, bits: int, buckets: Sequence[int]) -> tuple[sql.Composable, Params]:
    """The distinct row texts (with their copies) of the rows in the given buckets."""
    query = sql.SQL(
        "SELECT {text}, count(*) FROM {t} AS t WHERE ({h} >> %s)::integer = ANY(%s::integer[]) GROUP BY 1"
    ).format(text=row_text(spec), t=table_ident(spec), h=row_hash(spec))
    return query, [64 - bits, list(buckets)]


def row_copies(spec: TableSpec, rows: Sequence[str]) -> tuple[sql.Composable, Params]:
    """How many copies of each given row text the table holds (0 for none)."""
    query = sql.SQL(
        "SELECT u.r, count(s.r) FROM unnest(%s::text[]) AS u(r)"
        ' LEFT JOIN (SELECT {text} AS r FROM {t} AS t OFFSET 0) AS s ON s.r = u.r COLLATE "C" GROUP BY u.r'
    ).format(text=row_text(spec), t=table_ident(spec))
    return query, [list(rows)]
