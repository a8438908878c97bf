"""The SQL a folded segment is applied with (`prepare_script`, `run_script`): deletes and upserts over
`json_to_recordset` of the values as Debezium sent them, partial updates for unchanged TOAST values,
and key moves through a copy of the old rows. Each statement's text is built once per table."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from psycopg2 import sql

from lambdas.core.changestream import state
from lambdas.core.changestream.convert import ColumnType, SqlConversion, to_text
from lambdas.core.changestream.folding import Origin, Rows
from lambdas.core.changestream.target import TargetTable
from lambdas.core.db import Cursor
from lambdas.core.tables import TableName

_ORDINAL = "zdm ordinal"  # the recordset's row number, for the rows a partial update did not find


@dataclass
class Script:
    """A segment's statements: those run in one round trip, then partial updates (which return rows)."""

    statements: list[tuple[str, str]] = field(default_factory=list)  # (SQL, JSON payload)
    partial: list[tuple[str, str, list[Hashable]]] = field(default_factory=list)  # (SQL, payload, fold keys)
    # key moves: the old rows are copied aside before any statement, the new ones written after the others;
    # then the row of a trailing delete is kept for the next batch
    stash: list[tuple[str, str]] = field(default_factory=list)  # (SQL, payload)
    moves: list[tuple[str, str, list[Hashable]]] = field(default_factory=list)  # (SQL, payload, fold keys)
    after: list[tuple[str, str]] = field(default_factory=list)  # (SQL, payload)


def prepare_script(cur: Cursor, table: TargetTable, rows: Rows, *, python: bool, last: bool = False) -> Script:
    """The statements and their JSON payloads: values as Debezium sent them, converted by PostgreSQL
    (`python`: every value converted by `to_text` first). Raises ConversionError before any statement runs."""
    conversions = table.plan.conversions[python]
    script = Script()
    if rows.deletes:
        statement = _statement(cur, table, "delete", table.key, python)
        script.statements.append((statement, _payload(table, [v for _, v in rows.deletes], table.key, conversions)))
    for (columns, kept), entries in rows.upserts.items():
        payload = _payload(table, [v for _, v in entries], columns, conversions)
        if not kept:
            script.statements.append((_statement(cur, table, "upsert", columns, python), payload))
        else:
            script.partial.append((_statement(cur, table, "update", columns, python), payload, [k for k, _ in entries]))
    trailing = rows.trailing_delete if last else None
    if rows.moves:
        # the old rows of this segment's moves, and the row its last delete removes, copied aside first
        aside = [o.key for entries in rows.moves.values() for _, _, o in entries if o.key is not None]
        aside += [trailing[0]] if trailing else []
        script.stash.append((_stash_statement(cur, table, python), _payload(table, aside, table.key, conversions)))
    for (columns, kept), moved in rows.moves.items():
        fields = [*columns, *(_origin(k) for k in table.key), _ORIGIN_LSN]
        payload = _payload(
            table, [{**values, **_origin_values(table, origin)} for _, values, origin in moved], fields, conversions
        )
        script.moves.append((_move_statement(cur, table, columns, kept, python), payload, [k for k, _, _ in moved]))
    if trailing:
        payload = _payload(table, [{**trailing[0], _ORIGIN_LSN: trailing[1]}], [*table.key, _ORIGIN_LSN], conversions)
        if rows.moves:  # after the moves have read the row the previous batch kept; from the copy aside
            script.after.append((_keep_statement(cur, table, python, aside=True), payload))
        else:  # no moves (the usual case): straight from the table, before the deletes, in the first round trip
            script.stash.append((_keep_statement(cur, table, python, aside=False), payload))
    return script


def run_script(cur: Cursor, script: Script, savepoint: str) -> list[Hashable]:
    """Runs the script under `savepoint` (its first statement); returns the fold keys of partial updates
    whose row was not on the target. On an error the savepoint exists: roll back to it."""
    first = [*script.stash, *script.statements]
    statements = [f"SAVEPOINT {savepoint}", *(s for s, _ in first)]
    returning = [*script.partial, *script.moves]
    if not returning and not script.after:
        statements.append(f"RELEASE SAVEPOINT {savepoint}")
    cur.execute("; ".join(statements), [p for _, p in first] or None)
    missing: list[Hashable] = []
    for statement, payload, keys in returning:
        cur.execute(statement, (payload,))
        found = {n for (n,) in cur.fetchall()}
        missing += [k for n, k in enumerate(keys, 1) if n not in found]
    for statement, payload in script.after:
        cur.execute(statement, (payload,))
    if returning or script.after:
        cur.execute(f"RELEASE SAVEPOINT {savepoint}")
    return missing


def _payload(
    table: TargetTable, rows: list[Mapping[str, Any]], columns: Sequence[str], conversions: Mapping[str, SqlConversion]
) -> str:
    converted = [
        (c, table.columns[_column_of(c)]) for c in columns if c != _ORIGIN_LSN and conversions[_column_of(c)].python
    ]  # (a key column named "lsn" is "zdm old lsn": the two never meet)
    if converted:
        rows = [_converted(values, converted) for values in rows]
    try:
        return _encode(rows).decode()
    except (UnicodeEncodeError, TypeError):  # a lone surrogate from the lenient reader: JSON escapes it
        return json.dumps(rows)


_encode = msgspec.json.Encoder().encode


def _converted(values: Mapping[str, Any], columns: list[tuple[str, ColumnType]]) -> dict[str, Any]:
    out = dict(values)
    for name, column in columns:
        if name in out:
            out[name] = to_text(out[name], column)
    return out


def _statement(cur: Cursor, table: TargetTable, kind: str, columns: tuple[str, ...], python: bool) -> str:
    """The SQL text of a delete, upsert or partial update of `columns`, built once per table."""
    statements = table.plan.statements
    statement = statements.get((kind, columns, python))
    if statement is None:
        build = {"delete": _delete_sql, "upsert": _upsert_sql, "update": _update_sql}[kind]
        statement = statements[(kind, columns, python)] = build(
            table, columns, table.plan.conversions[python]
        ).as_string(cur)
    return statement


def _raw(text: str) -> sql.SQL:
    return sql.SQL(text.replace("%", "%%"))  # the statements take parameters: a literal % is doubled


def _recordset(columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("json_to_recordset(%s::json) AS x({})").format(
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), _raw(conversions[c].field_type)) for c in columns)
    )


def _numbered_recordset(columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("ROWS FROM (json_to_recordset(%s::json) AS ({})) WITH ORDINALITY AS x({}, {})").format(
        sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), _raw(conversions[c].field_type)) for c in columns
        ),
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.Identifier(_ORDINAL),
    )


def _value(column: str, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    # the type text comes from the target's own catalog (format_type), already quoted where needed
    return _raw(conversions[column].expression).format(sql.SQL("x.") + sql.Identifier(column))


def _key_match(table: TargetTable, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("t.{} = {}").format(sql.Identifier(k), _value(k, conversions)) for k in table.key
    )


def _delete_sql(table: TargetTable, key: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("DELETE FROM {} AS t USING {} WHERE {}").format(
        table.name.ident, _recordset(key, conversions), _key_match(table, conversions)
    )


def _upsert_sql(table: TargetTable, columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    updates = [c for c in columns if c not in table.key]
    conflict = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
        )
        if updates
        else sql.SQL("DO NOTHING")
    )
    return sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} ON CONFLICT ({}) {}").format(
        table.name.ident,
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join(_value(c, conversions) for c in columns),
        _recordset(columns, conversions),
        sql.SQL(", ").join(map(sql.Identifier, table.key)),
        conflict,
    )


def _update_sql(table: TargetTable, columns: Sequence[str], conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    """Unchanged TOAST columns: only an existing row can be updated; it keeps those values."""
    updates = [c for c in columns if c not in table.key]
    return sql.SQL("UPDATE {} AS t SET {} FROM {} WHERE {} RETURNING x.{}").format(
        table.name.ident,
        sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(c), _value(c, conversions)) for c in updates)
        if updates
        else sql.SQL("{0} = t.{0}").format(sql.Identifier(table.key[0])),
        _numbered_recordset(columns, conversions),
        _key_match(table, conversions),
        sql.Identifier(_ORDINAL),
    )


_ORIGIN = "zdm old "  # a key move's payload: the old row's key columns, beside the new row's values
_ORIGIN_LSN = "zdm deleted at lsn"  # ... or the LSN of the delete that ended the previous batch (not a column)


def _origin(column: str) -> str:
    return _ORIGIN + column


def _column_of(field_name: str) -> str:
    return field_name.removeprefix(_ORIGIN)


def _origin_values(table: TargetTable, origin: Origin) -> dict[str, Any]:
    key = origin.key or {}
    return {**{_origin(k): key.get(k) for k in table.key}, _ORIGIN_LSN: origin.lsn}


def _stash_names(table: TargetTable) -> tuple[sql.Identifier, sql.Identifier]:
    """Two tables shaped like `table`: a temporary one for the old rows of a segment's key moves, copied
    before its deletes; and one in the state schema keeping the row a batch's last delete removed, with
    that delete's LSN, for a move whose create starts the next batch."""
    # Named by the table and the columns it holds (the applier's columns, listed explicitly below): a
    # column added to or dropped from the target never meets a copy of the old shape.
    shape = "\x00".join([table.label, *table.plan.order])
    name = state.KEPT_ROWS_PREFIX + hashlib.sha256(shape.encode()).hexdigest()[:16]
    return sql.Identifier(name), sql.Identifier(state.SCHEMA, name)


def _row_columns(table: TargetTable, alias: str) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(alias, c) for c in table.plan.order)


def _column_names(table: TargetTable) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, table.plan.order))


def _keys_match(
    table: TargetTable, conversions: Mapping[str, SqlConversion], alias: str, prefix: str
) -> sql.Composable:
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = {}").format(
            sql.Identifier(alias),
            sql.Identifier(k),
            _raw(conversions[k].expression).format(sql.SQL("x.") + sql.Identifier(prefix + k)),
        )
        for k in table.key
    )


def _cached(table: TargetTable, name: tuple[Any, ...], build: Any, cur: Cursor) -> str:
    statements = table.plan.statements
    statement = statements.get(name)
    if statement is None:
        statement = statements[name] = build().as_string(cur)
    return statement


def _stash_statement(cur: Cursor, table: TargetTable, python: bool) -> str:
    conversions = table.plan.conversions[python]
    aside, kept = _stash_names(table)
    return _cached(
        table,
        ("stash", python),
        lambda: sql.SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {aside} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {t} WITH NO DATA;"
            " DELETE FROM {aside};"
            " CREATE TABLE IF NOT EXISTS {kept} AS SELECT NULL::bigint AS {lsn}, {cols} FROM {t} WITH NO DATA;"
            " INSERT INTO {aside} ({cols}) SELECT {tcols} FROM {t} AS t, {keys} WHERE {match}"
        ).format(
            aside=aside,
            kept=kept,
            lsn=sql.Identifier(_ORIGIN_LSN),
            t=table.name.ident,
            cols=_column_names(table),
            tcols=_row_columns(table, "t"),
            keys=_recordset(table.key, conversions),
            match=_key_match(table, conversions),
        ),
        cur,
    )


def _keep_statement(cur: Cursor, table: TargetTable, python: bool, *, aside: bool) -> str:
    """Keep (only) the row the batch's last delete removes, with the delete's LSN: from the copy made
    aside (`aside`, after the deletes), or from the table itself (before them)."""
    conversions = table.plan.conversions[python]
    aside_table, kept = _stash_names(table)
    fields = [*table.key, _ORIGIN_LSN]
    return _cached(
        table,
        ("keep", aside, python),
        lambda: sql.SQL(
            "CREATE TABLE IF NOT EXISTS {kept} AS SELECT NULL::bigint AS {lsn}, {cols} FROM {t} WITH NO DATA;"
            " WITH x AS (SELECT * FROM json_to_recordset(%s::json) AS x({types})),"
            " found AS (SELECT x.{lsn}, {mcols} FROM {source} AS m, x WHERE {match}),"
            # a delete published again (connector restart) finds its row gone: the row kept at its LSN stays
            " cleared AS (DELETE FROM {kept} AS k WHERE EXISTS (SELECT FROM found)"
            "  OR k.{lsn} IS DISTINCT FROM (SELECT x.{lsn} FROM x LIMIT 1))"
            " INSERT INTO {kept} ({lsn}, {cols}) SELECT * FROM found"
        ).format(
            kept=kept,
            t=table.name.ident,
            cols=_column_names(table),
            mcols=_row_columns(table, "m"),
            source=aside_table if aside else table.name.ident,
            lsn=sql.Identifier(_ORIGIN_LSN),
            types=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(f), _field_type(f, conversions)) for f in fields
            ),
            match=_keys_match(table, conversions, "m", ""),
        ),
        cur,
    )


def _field_type(field_name: str, conversions: Mapping[str, SqlConversion]) -> sql.Composable:
    return sql.SQL("bigint") if field_name == _ORIGIN_LSN else _raw(conversions[_column_of(field_name)].field_type)


def _move_statement(
    cur: Cursor, table: TargetTable, columns: tuple[str, ...], kept: tuple[str, ...], python: bool
) -> str:
    """Write moved rows: the values sent, and the kept columns from the old row copied aside (this
    segment's, or the one the previous batch kept), or, when neither is there, from the new row itself
    (the move was applied before: Debezium republished it). Returns the payload's row numbers written
    (a row found nowhere is not)."""
    conversions = table.plan.conversions[python]
    fields = [*columns, *(_origin(k) for k in table.key), _ORIGIN_LSN]
    written = [*columns, *kept]
    updates = [c for c in written if c not in table.key]
    first_key = sql.Identifier(table.key[0])  # key columns are never NULL: a row was found if it is not
    aside, previous = _stash_names(table)

    def build() -> sql.Composable:
        return sql.SQL(
            "WITH src AS (SELECT x.{n}, {values}, {kept} FROM ROWS FROM (json_to_recordset(%s::json) AS ({types}))"
            " WITH ORDINALITY AS x({names}, {n}) LEFT JOIN {aside} AS m ON {old_match}"
            " LEFT JOIN {previous} AS p ON p.{lsn} = x.{lsn} LEFT JOIN {t} AS now ON {new_match}"
            " WHERE m.{k} IS NOT NULL OR p.{k} IS NOT NULL OR now.{k} IS NOT NULL),"
            " written AS (INSERT INTO {t} ({written}) OVERRIDING SYSTEM VALUE SELECT {written} FROM src"
            " ON CONFLICT ({key}) {conflict})"
            " SELECT {n} FROM src"
        ).format(
            n=sql.Identifier(_ORDINAL),
            values=sql.SQL(", ").join(
                sql.SQL("{} AS {}").format(_value(c, conversions), sql.Identifier(c)) for c in columns
            ),
            kept=sql.SQL(", ").join(
                sql.SQL(
                    "CASE WHEN m.{k} IS NOT NULL THEN m.{c} WHEN p.{k} IS NOT NULL THEN p.{c} ELSE now.{c} END AS {c}"
                ).format(k=first_key, c=sql.Identifier(c))
                for c in kept
            ),
            types=sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(f), _field_type(f, conversions)) for f in fields
            ),
            names=sql.SQL(", ").join(map(sql.Identifier, fields)),
            aside=aside,
            previous=previous,
            lsn=sql.Identifier(_ORIGIN_LSN),
            old_match=_keys_match(table, conversions, "m", _ORIGIN),
            new_match=_keys_match(table, conversions, "now", ""),
            t=table.name.ident,
            k=first_key,
            written=sql.SQL(", ").join(map(sql.Identifier, written)),
            key=sql.SQL(", ").join(map(sql.Identifier, table.key)),
            conflict=sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
            )
            if updates
            else sql.SQL("DO NOTHING"),
        )

    return _cached(table, ("move", columns, kept, python), build, cur)


def truncate_table(cur: Cursor, table: TableName) -> None:
    # DELETE, not TRUNCATE: TRUNCATE refuses a table other tables reference, even in replica mode
    cur.execute(sql.SQL("DELETE FROM {}").format(table.ident))
