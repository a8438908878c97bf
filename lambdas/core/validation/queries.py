"""The validator's SQL, built with psycopg2.sql: identifiers quoted, every value a parameter.

Type names in casts (`%s::bigint`) come from the catalog's format_type(), as in
`ranges.range_predicate`; nothing a user typed is ever spliced into SQL text.

A row's hash is a bigint computed inside the database from the text form of each compared
column (in the source's column order, so the two sides' physical column orders do not matter):
- `hashtextextended` (RowHash.FAST): each column hashed with its position as the seed (a NULL
  gives a fixed per-column value) and the column hashes XORed. A column is hashed by its text form
  (character(n) by its output function's, blank padding included: ::text drops it), or, for
  integer and uuid columns of the same kind on both sides (`model.ValueHash`), by its value with
  the type's own hash (no output function). PostgreSQL's integer hash folds 64 bits to 32 (low half
  XOR high half, so that int2/4/8 hash alike: 0 and 4294967297 collide), so an integer's high half
  is hashed too, under another seed: the pair determines the value. Timestamps, whose hash is the
  same folded integer hash and which have no cheap cast to bigint, are hashed by their text.
  About 35% cheaper than hashing the whole ROW(...)::text once
  (record_out's quoting costs as much as the columns' output). Chosen only when both servers
  were seen to give the same hashes (texts and values) with the same encoding.
- md5 (RowHash.MD5): the first 64 bits of md5 of ROW(c1, c2, ...)::text as UTF-8 bytes, the
  same on any server, encoding and version.
Every text is hashed under COLLATE "C", so a nondeterministic collation cannot make 'A' and
'a' hash alike. A range's aggregate is count(*) and the exact (numeric) sum of the row hashes:
order-independent, and unlike XOR it does not cancel duplicate rows.

Many key ranges are compared in one statement (`range_aggregates`, `range_lines`): the ranges
travel as typed arrays (one parameter each, parsed by array_in) or, cut at equal widths of an
integer key (`bisect.EvenRanges`), as arithmetic over generate_series; each is read by its own
index range scan under a LATERAL join and aggregated on its own (a plain aggregate per range: no
hash table, no sort; measured cheaper than GROUP BY of a bucket expression). Ranges with an open
end (the first and last of a table) are read by a branch of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2 import sql

from lambdas.core.ranges import KeyRange, range_predicate
from lambdas.core.validation.bisect import EvenRanges, KeyBuckets, KeyHashes, UuidPrefixes, prefix_range
from lambdas.core.validation.model import Key, RowHash, TableSpec, ValueHash

Params = list[Any]


def table_ident(spec: TableSpec) -> sql.Composable:
    ident = sql.Identifier(spec.schema_name, spec.name)
    return sql.SQL("ONLY {}").format(ident) if spec.only else ident


def row_text(spec: TableSpec, alias: str = "t") -> sql.Composable:
    cols = sql.SQL(", ").join(sql.Identifier(alias, c) for c in spec.column_names)
    return sql.SQL("ROW({})::text").format(cols)


def hash_of(text: sql.Composable, row_hash: RowHash) -> sql.Composable:
    """The md5 form of a text's 64-bit hash (multiset buckets and the md5 row hash)."""
    if row_hash is RowHash.FAST:
        return sql.SQL('hashtextextended({} COLLATE "C", 0)').format(text)
    return sql.SQL("('x' || left(md5(convert_to({}, 'UTF8')), 16))::bit(64)::bigint").format(text)


# hashint8extended (and timestamp_hash_extended, which is hashint8extended) folds the 64-bit value
# to 32 bits (low half XOR high half) before hashing, so that int2/int4/int8 hash alike: 0 and
# 4294967297 hash the same. An integer's high half is hashed as well (with another seed), which
# makes the pair determine the value; a timestamp, which has no cheap cast to bigint, is hashed
# by its text form.
_VALUE_HASH_SQL = {
    ValueHash.TEXT: 'hashtextextended({c}::text COLLATE "C", {seed})',
    ValueHash.INTEGER: "(hashint8extended({c}::bigint, {seed}) # hashint8extended({c}::bigint >> 32, -{seed}))",
    ValueHash.TIMESTAMP: 'hashtextextended({c}::text COLLATE "C", {seed})',
    ValueHash.TIMESTAMPTZ: 'hashtextextended({c}::text COLLATE "C", {seed})',
    ValueHash.UUID: "uuid_hash_extended({c}, {seed})",
}


def column_text(column: sql.Composable, type_name: str) -> sql.Composable:
    """A column's text form: what its output function gives, as a client reads it and ROW(...)::text has it.
    For character/bpchar and xml, the cast to text gives something else: it drops the trailing spaces an
    unconstrained bpchar keeps, and gives xml's text as stored, with a default declaration
    (`<?xml version="1.0"?>`) that the output function leaves out, as COPY, pg_dump and replication do."""
    if type_name == "bpchar" or type_name.startswith("character(") or type_name == "character":
        return sql.SQL("textin(bpcharout({}::bpchar))").format(column)
    if type_name == "xml":
        return sql.SQL("textin(xml_out({}))").format(column)
    return sql.SQL("{}::text").format(column)


def column_hashes(spec: TableSpec, alias: str = "t") -> list[sql.Composable]:
    """Each compared column's 64-bit hash (a NULL gives a fixed per-column value): the parts the fast
    row hash XORs, or under md5 the md5 form of each column's text."""
    parts: list[sql.Composable] = []
    for i, column in enumerate(spec.columns, start=1):
        ident = sql.Identifier(alias, column.name)
        if spec.row_hash is RowHash.MD5:
            value = hash_of(column_text(ident, column.type), RowHash.MD5)
        elif column.hash is ValueHash.TEXT:
            value = sql.SQL('hashtextextended({t} COLLATE "C", {seed})').format(
                t=column_text(ident, column.type), seed=sql.Literal(i)
            )
        else:
            value = sql.SQL(_VALUE_HASH_SQL[column.hash]).format(c=ident, seed=sql.Literal(i))
        parts.append(sql.SQL("coalesce({}, {})").format(value, sql.Literal(-i)))
    return parts


def row_hash(spec: TableSpec, alias: str = "t") -> sql.Composable:
    """The row's 64-bit hash (see the module docstring)."""
    if spec.row_hash is RowHash.MD5 or not spec.columns:
        return hash_of(row_text(spec, alias), spec.row_hash)
    return sql.SQL("({})").format(sql.SQL(" # ").join(column_hashes(spec, alias)))


def _key_texts(spec: TableSpec, alias: str = "t") -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(alias, k)) for k in spec.key)


def _key_order(spec: TableSpec, alias: str = "t") -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, k) for k in spec.key)


def _where(spec: TableSpec, key_range: KeyRange) -> tuple[sql.Composable, Params]:
    predicate, params = range_predicate(spec.key, spec.key_types, key_range)
    return predicate, list(params)


def array_literal(values: Sequence[str]) -> str:
    """A PostgreSQL array literal of texts (`{"a","b"}`): a long list as one parameter, parsed by array_in."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def _range_sets(
    spec: TableSpec, ranges: Sequence[KeyRange], positions: Sequence[int] | None
) -> tuple[sql.Composable | None, sql.Composable, Params, list[tuple[int, sql.Composable, Params]]]:
    """The ranges at `positions` (all when None) as SQL: most as one LATERAL source `r` (one row per
    range, its position in r.i) with the WHERE clause selecting a range's rows and their parameters;
    the others (open-ended, or the outer ones of `EvenRanges`) as (position, WHERE clause, parameters)."""
    chosen = range(len(ranges)) if positions is None else positions
    if isinstance(ranges, EvenRanges):
        last = len(ranges) - 1
        inner = [i for i in chosen if 0 < i < last]
        single = [(i, *_where(spec, ranges[i])) for i in chosen if i in (0, last)]
        if not inner:
            return None, sql.SQL(""), [], single
        if positions is None:
            source: sql.Composable = sql.SQL("generate_series(1, %s) AS r(i)")
            params: Params = [last - 1]
        else:
            source = sql.SQL("unnest(%s::integer[]) AS r(i)")
            params = ["{" + ",".join(map(str, inner)) + "}"]
        # Bounds as low + i * width in bigint, or in numeric when an intermediate could overflow bigint.
        small = ranges.low > -(2**62) and ranges.low + len(ranges) * ranges.width < 2**62
        arithmetic = sql.SQL("bigint" if small else "numeric")
        where = sql.SQL(
            "{k} >= (%s::{a} + r.i * %s::{a})::bigint AND {k} < (%s::{a} + (r.i + 1) * %s::{a})::bigint"
        ).format(k=sql.Identifier("t", spec.key[0]), a=arithmetic)
        return source, where, [*params, ranges.low, ranges.width, ranges.low, ranges.width], single
    closed = [i for i in chosen if ranges[i].lower is not None and ranges[i].upper is not None]
    single = [(i, *_where(spec, ranges[i])) for i in chosen if ranges[i].lower is None or ranges[i].upper is None]
    if not closed:
        return None, sql.SQL(""), [], single
    n = len(spec.key)
    names = [sql.Identifier(f"lo{k}") for k in range(n)] + [sql.Identifier(f"hi{k}") for k in range(n)]
    # The bounds travel as text arrays, each element cast to the key's type: an array of an array
    # type (an array-typed key) is a multidimensional array to array_in, not an array of arrays.
    source = sql.SQL("unnest(%s::integer[], {arrays}) AS r(i, {names})").format(
        arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(2 * n)),
        names=sql.SQL(", ").join(names),
    )
    params = ["{" + ",".join(map(str, closed)) + "}"]
    params += [array_literal([ranges[i].lower[k] for i in closed]) for k in range(n)]  # type: ignore[index]
    params += [array_literal([ranges[i].upper[k] for i in closed]) for k in range(n)]  # type: ignore[index]
    cols = sql.SQL(", ").join(sql.Identifier("t", k) for k in spec.key)
    where = sql.SQL("({cols}) >= ({lo}) AND ({cols}) < ({hi})").format(
        cols=cols,
        lo=sql.SQL(", ").join(
            sql.SQL("r.{}::{}").format(name, sql.SQL(t)) for name, t in zip(names[:n], spec.key_types, strict=True)
        ),
        hi=sql.SQL(", ").join(
            sql.SQL("r.{}::{}").format(name, sql.SQL(t)) for name, t in zip(names[n:], spec.key_types, strict=True)
        ),
    )
    return source, where, params, single


def range_aggregates(
    spec: TableSpec, ranges: Sequence[KeyRange], positions: Sequence[int] | None = None
) -> tuple[sql.Composable, Params]:
    """One row: the total count, and each range's `count sum` (exact sum of row hashes) as one line per
    range, in the order given, newline-separated. Both sides given the same ranges give byte-equal
    texts when the ranges hold the same rows (one comparison), and otherwise differ exactly in the
    lines of the differing ranges."""
    h, t = row_hash(spec), table_ident(spec)
    branches: list[sql.Composable] = []
    source, where, params, single = _range_sets(spec, ranges, positions)
    if source is not None:
        branches.append(
            sql.SQL(
                "SELECT r.i, a.n, a.s FROM {source} CROSS JOIN LATERAL"
                " (SELECT count(*) AS n, coalesce(sum({h}), 0) AS s FROM {t} AS t WHERE {where}) AS a"
            ).format(source=source, h=h, t=t, where=where)
        )
    for i, range_where, range_params in single:
        branches.append(
            sql.SQL("SELECT %s, count(*), coalesce(sum({h}), 0) FROM {t} AS t WHERE {where}").format(
                h=h, t=t, where=range_where
            )
        )
        params += [i, *range_params]
    query = sql.SQL(
        "SELECT coalesce(sum(x.n), 0), coalesce(string_agg(x.n || ' ' || x.s, E'\\n' ORDER BY x.i), '')"
        " FROM ({branches}) AS x(i, n, s)"
    ).format(branches=sql.SQL(" UNION ALL ").join(branches))
    return query, params


def key_span(spec: TableSpec, key_range: KeyRange) -> tuple[sql.Composable, Params]:
    """The least and greatest key in a range, as text (two index probes; NULLs when it is empty)."""
    where, params = _where(spec, key_range)
    k = sql.Identifier("t", spec.key[0])
    query = sql.SQL("SELECT min({k})::text, max({k})::text FROM {t} AS t WHERE {where}").format(
        k=k, t=table_ident(spec), where=where
    )
    return query, params


def sampled_keys(spec: TableSpec, key_range: KeyRange, every: int) -> tuple[sql.Composable, Params]:
    """About one key in `every` of a range, at random, in key order, as text: cut points for ranges of
    about `every` rows. Reads only the key (an index-only scan where the visibility map allows)."""
    where, params = _where(spec, key_range)
    query = sql.SQL("SELECT {keys} FROM {t} AS t WHERE {where} AND random() < %s ORDER BY {order}").format(
        keys=_key_texts(spec), t=table_ident(spec), where=where, order=_key_order(spec)
    )
    return query, [*params, 1.0 / max(1, every)]


def sampled_page_keys(spec: TableSpec, percent: float, group: Where, limit: int) -> tuple[sql.Composable, Params]:
    """The keys (as text) of at most `limit` rows on about `percent` of the table's pages, picked at
    random but the same each time (TABLESAMPLE SYSTEM ... REPEATABLE: a run decides as the last one
    did), of the rows `group` selects (`bucket_group`)."""
    where, params = group
    query = sql.SQL("SELECT {keys} FROM {t} AS t TABLESAMPLE SYSTEM (%s) REPEATABLE (0) WHERE {where} LIMIT %s").format(
        keys=_key_texts(spec), t=table_ident(spec), where=where
    )
    return query, [percent, *params, limit]


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


def _hash_line(spec: TableSpec) -> sql.Composable:
    """A row's `key<TAB>...<TAB>hash` line (`rowdiff.diff_hash_lines`)."""
    return sql.SQL(r" || E'\t' || ").join([*_key_line_parts(spec), sql.SQL("{}::text").format(row_hash(spec))])


def range_lines(
    spec: TableSpec, ranges: Sequence[KeyRange], positions: Sequence[int] | None = None
) -> tuple[sql.Composable, Params]:
    """One row: the count and every row's `key<TAB>...<TAB>hash` line in the ranges at `positions`,
    newline-separated (`rowdiff.diff_hash_lines`).

    One aggregated value instead of a row per key: the client receives a single string and
    splits it in C, instead of a Python call per row. No ORDER BY (that would sort): the lines
    are diffed as sets.
    """
    line = _hash_line(spec)
    t = table_ident(spec)
    branches: list[sql.Composable] = []
    source, where, params, single = _range_sets(spec, ranges, positions)
    if source is not None:
        branches.append(
            sql.SQL(
                "SELECT l.line FROM {source} CROSS JOIN LATERAL (SELECT {line} AS line FROM {t} AS t WHERE {where}) AS l"
            ).format(source=source, line=line, t=t, where=where)
        )
    for _, range_where, range_params in single:
        branches.append(sql.SQL("SELECT {line} FROM {t} AS t WHERE {where}").format(line=line, t=t, where=range_where))
        params += range_params
    query = sql.SQL(r"SELECT count(*), coalesce(string_agg(s.line, E'\n'), '') FROM ({}) AS s(line)").format(
        sql.SQL(" UNION ALL ").join(branches)
    )
    return query, params


def _part_hash(spec: TableSpec, *, of_key: bool) -> sql.Composable:
    key = set(spec.key)
    return row_hash(spec.model_copy(update={"columns": [c for c in spec.columns if (c.name in key) == of_key]}))


def non_key_hash(spec: TableSpec) -> sql.Composable:
    """The row hash (`row_hash`) of the columns outside the key: enough beside the key's own value."""
    return _part_hash(spec, of_key=False)


def key_hash(spec: TableSpec) -> sql.Composable:
    """The row hash (`row_hash`) of the key's columns alone: a key's bucket (`bisect.KeyHashes`)."""
    return _part_hash(spec, of_key=True)


def _key_sends(spec: TableSpec) -> list[sql.Composable]:
    """Each key column as `rowdiff.RecordLayout` has it: an integer cast to bigint by int8send, a uuid by uuid_send."""
    return [
        sql.SQL("uuid_send({})" if type_name == "uuid" else "int8send({}::bigint)").format(sql.Identifier("t", column))
        for column, type_name in zip(spec.key, spec.key_types, strict=True)
    ]


def range_records(spec: TableSpec, key_range: KeyRange) -> tuple[sql.Composable, Params]:
    """One row, one field: every row's binary record in a range of a key of integer and uuid columns
    (`rowdiff.RecordLayout`: the key as its send functions write it, then int8send of the hash of
    the other columns), concatenated (`rowdiff.diff_hash_records`); read with `session.run_copy_row`,
    so the bytes travel as they are.

    For dense differences: every row is read once, as in an aggregate, and only 16 bytes per row
    (a bigint key) more travel. The key travels as itself, so it is not hashed, and the row count
    is the records' total length / their size (both measured: 1.24x an aggregate's server time
    with them, 1.13x without). No ORDER BY (a sort): the rows come in the index's key order in
    practice, and any order gives the same diff.
    """
    where, params = _where(spec, key_range)
    query = sql.SQL("SELECT coalesce(string_agg({r}, ''::bytea), ''::bytea) FROM {t} AS t WHERE {where}").format(
        r=_record(spec), t=table_ident(spec), where=where
    )
    return query, params


def _record(spec: TableSpec) -> sql.Composable:
    return sql.SQL(" || ").join([*_key_sends(spec), sql.SQL("int8send({})").format(non_key_hash(spec))])


def bucket_of(spec: TableSpec, buckets: KeyBuckets) -> tuple[sql.Composable, Params]:
    """A row's bucket (an integer) as SQL: a uuid key's leading bits, an integer key's width (clamped
    to the first and last bucket, which are open below and above), or any key's hash's top bits."""
    if isinstance(buckets, KeyHashes):
        return sql.SQL("({} >> %s)::integer").format(key_hash(spec)), [64 - buckets.bits]
    k = sql.Identifier("t", spec.key[0])
    if isinstance(buckets, UuidPrefixes):
        prefix = sql.SQL("(((get_byte(uuid_send({k}), 0) << 8) | get_byte(uuid_send({k}), 1)) >> %s)")
        return prefix.format(k=k), [16 - buckets.bits]
    ranges = buckets.ranges
    if ranges.low > -(2**62) and ranges.low + len(ranges) * ranges.width < 2**62:
        position = sql.SQL("({k}::bigint - %s) / %s").format(k=k)
    else:  # the difference could overflow bigint
        position = sql.SQL("floor(({k}::numeric - %s) / %s)").format(k=k)
    clamped = sql.SQL("greatest(0, least(%s, {position}))::integer").format(position=position)
    return clamped, [len(ranges) - 1, ranges.low, ranges.width]


Where = tuple[sql.Composable, Params]
EVERY_ROW: Where = (sql.SQL("true"), [])


def bucket_group(spec: TableSpec, buckets: KeyBuckets, group: int, groups: int) -> Where:
    """A WHERE clause selecting the rows of one of `groups` groups (a power of 2) of the key's buckets:
    those whose buckets' top bits are `group` (every row when there is one group). A uuid's leading bits
    are a key range (a comparison); a hash's top bits are computed (the key's hash, as `bucket_of`).
    Buckets of an integer's widths are not grouped: their bounds come from the least and greatest key
    at the time, which another chunk could see otherwise."""
    if groups == 1:
        return EVERY_ROW
    bits = (groups - 1).bit_length()
    if isinstance(buckets, UuidPrefixes):
        return _where(spec, prefix_range(group, bits))
    if isinstance(buckets, KeyHashes):
        # >> is arithmetic on bigint: the mask keeps the top bits as an unsigned number
        return sql.SQL("(({} >> %s) & %s) = %s").format(key_hash(spec)), [64 - bits, groups - 1, group]
    raise ValueError("buckets of an integer key's widths are not split in groups")


def key_buckets(spec: TableSpec, buckets: KeyBuckets, group: Where = EVERY_ROW) -> tuple[sql.Composable, Params]:
    """(bucket, count, hash sum as text) per bucket of the key (`bucket_of`), in one scan of the whole table,
    of the rows `group` selects (`bucket_group`).

    A hash table of 1,024 groups costs about a third more than a plain aggregate (10M uuid rows: 6.6 s
    against 4.9 at 8 and 10 bits; 8.7 s at 12, 10.3 at 16, whose groups no longer stay in the CPU's
    caches).
    """
    bucket, params = bucket_of(spec, buckets)
    where, where_params = group
    query = sql.SQL("SELECT {b}, count(*), sum({h})::text FROM {t} AS t WHERE {where} GROUP BY 1").format(
        b=bucket, h=row_hash(spec), t=table_ident(spec), where=where
    )
    return query, [*params, *where_params]


def _in_buckets(spec: TableSpec, buckets: KeyBuckets, chosen: Sequence[int] | None, group: Where) -> Where:
    """A WHERE clause selecting the rows of the `chosen` buckets (in order; None: every row of the
    `group`, no bucket computed). For buckets that are key ranges, the rows between the first's and the
    last's bounds too: a comparison turns most rows away before the bucket is computed (measured, a
    scan of 10M uuid rows: 0.63 CPU-s against 1.37)."""
    if chosen is None:
        return group
    bucket, params = bucket_of(spec, buckets)
    clause = sql.SQL("{} = ANY(%s::integer[])").format(bucket)
    params = [*params, list(chosen)]
    if isinstance(buckets, KeyHashes) or not chosen:
        return clause, params
    span, span_params = _where(spec, KeyRange(buckets.range(chosen[0]).lower, buckets.range(chosen[-1]).upper))
    return sql.SQL("{} AND {}").format(span, clause), [*span_params, *params]


def bucket_lines(
    spec: TableSpec, buckets: KeyBuckets, chosen: Sequence[int] | None, group: Where = EVERY_ROW
) -> tuple[sql.Composable, Params]:
    """Rows of the key columns' texts and the row hash as text, read as COPY's text format (a
    `key<TAB>...<TAB>hash` line per row, escaped by COPY; `session.LineFrames`), of each row in the
    `chosen` buckets of `key_buckets` (None: of every row `group` selects), found by one more scan and
    sorted by the key's texts byte by byte (COLLATE "C": the order the diff walks in,
    `rowdiff.diff_line_streams`)."""
    where, params = _in_buckets(spec, buckets, chosen, group)
    texts = [sql.SQL("{}::text").format(sql.Identifier("t", k)) for k in spec.key]
    query = sql.SQL("SELECT {texts}, {h}::text FROM {t} AS t WHERE {where} ORDER BY {order}").format(
        texts=sql.SQL(", ").join(texts),
        h=row_hash(spec),
        t=table_ident(spec),
        where=where,
        order=sql.SQL(", ").join(sql.SQL('{} COLLATE "C"').format(text) for text in texts),
    )
    return query, params


def bucket_records(
    spec: TableSpec, buckets: KeyBuckets, chosen: Sequence[int] | None, group: Where = EVERY_ROW
) -> tuple[sql.Composable, Params]:
    """Rows of one field: the binary record (as `range_records`) of each row in the `chosen` buckets of
    `key_buckets` (None: of every row `group` selects), in key order, found by one more scan of the
    table (its rows lie all over it) and sorted by the server (in work_mem, else on disk); read as a
    stream (`session.CopyStream`).

    One statement for all the differing buckets, however many rows they hold: measured on 10M random
    uuids, a side, 8.1 CPU-s to scan, hash and sort every row's record (as one sorted aggregate; sent
    as COPY rows, a few percent more), against 1.56 s per million rows when each million was a scan
    and sort of its own.
    """
    where, params = _in_buckets(spec, buckets, chosen, group)
    query = sql.SQL("SELECT {r} FROM {t} AS t WHERE {where} ORDER BY {order}").format(
        r=_record(spec), order=_key_order(spec), t=table_ident(spec), where=where
    )
    return query, params


def quantiles(spec: TableSpec, key_range: KeyRange, step: int) -> tuple[sql.Composable, Params]:
    """Every `step`-th key of the range in key order, as text: boundaries that cut it into even parts.

    Reads only the key (an index-only scan where the visibility map allows), turned into text only
    for the rows kept. The subquery's columns are renamed positionally, so no table column name can
    collide with the row number.
    """
    where, params = _where(spec, key_range)
    aliases = [sql.Identifier(f"k{i}") for i in range(len(spec.key))]
    query = sql.SQL(
        "SELECT {outer} FROM (SELECT {keys}, row_number() OVER (ORDER BY {order}) FROM {t} AS t WHERE {where})"
        " AS s({aliases}, n) WHERE mod(s.n, %s) = 0 ORDER BY s.n"
    ).format(
        outer=sql.SQL(", ").join(sql.SQL("s.{}::text").format(a) for a in aliases),
        keys=_key_order(spec),
        order=_key_order(spec),
        t=table_ident(spec),
        where=where,
        aliases=sql.SQL(", ").join(aliases),
    )
    return query, [*params, step]


def row_images(spec: TableSpec, keys: Sequence[Key], *, with_version: bool) -> tuple[sql.Composable, Params]:
    """One row, one field: for each given key, in key order, a record of 8-byte integers (as int8send
    writes them): the key's position in `keys` (1-based; negative when the row does not exist), the
    row's xmin (when `with_version`, else 0; it changes with every update), then each compared
    column's hash (`column_hashes`): `rowdiff.parse_row_images`. Read with `session.run_copy_row`.

    Hashes rather than the columns' text: the client only names the columns that differ, and
    binary records cost it no Python object per value. Keys travel as one text array per key
    column, joined through unnest and cast to the key's types.
    """
    n = len(spec.key)
    u_cols = [sql.Identifier(f"k{i}") for i in range(n)]
    casts = [sql.SQL("u.{}::{}").format(c, sql.SQL(t)) for c, t in zip(u_cols, spec.key_types, strict=True)]
    version = sql.SQL("coalesce(t.xmin::text::bigint, 0)") if with_version else sql.SQL("0::bigint")
    fields = [
        sql.SQL("CASE WHEN t.{} IS NULL THEN -u.ord ELSE u.ord END").format(sql.Identifier(spec.key[0])),
        version,
        *column_hashes(spec),
    ]
    query = sql.SQL(
        "SELECT coalesce(string_agg({record}, ''::bytea ORDER BY {casts}), ''::bytea)"
        " FROM unnest({arrays}) WITH ORDINALITY AS u({u_cols}, ord)"
        " LEFT JOIN {t} AS t ON ({t_keys}) = ({casts})"
    ).format(
        record=sql.SQL(" || ").join(sql.SQL("int8send({})").format(f) for f in fields),
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
