"""Indexes built after the initial copy instead of maintained row by row during it.

Building an index once from the copied rows is several times cheaper than inserting into
it for every row. Before a table's copy, its plain secondary indexes and its primary-key
and unique constraints that no foreign key depends on are dropped, each with the DDL that
recreates it recorded on the target in the same transaction; the worker that finishes the
table's copy recreates them (overlapping other tables' copy). Whatever a crash leaves
recorded is recreated by the next start or by teardown, so no index is ever lost.
Constraints a foreign key depends on, the replica identity index and partitioned tables
are left alone.
"""

from __future__ import annotations

import re

from psycopg2 import sql

from lambdas.core.catalog import TableInfo
from lambdas.core.db import Connection, execute, fetch_all, fetch_value
from lambdas.core.tables import TableName

_CANDIDATES = """
WITH t AS (
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = %(schema)s AND c.relname = %(table)s
)
SELECT 'index', ic.relname, pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
 WHERE i.indrelid = (SELECT oid FROM t) AND NOT i.indisreplident
   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)  -- part of a partitioned index
UNION ALL
SELECT 'constraint', k.conname, pg_get_constraintdef(k.oid)
  FROM pg_constraint k JOIN pg_index i ON i.indexrelid = k.conindid
 WHERE k.conrelid = (SELECT oid FROM t) AND k.contype IN ('p', 'u') AND NOT i.indisreplident
   AND k.conparentid = 0  -- a partition's copy of its parent's constraint cannot be dropped alone
   AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = k.conindid)
"""


def ensure_deferred_table(target: Connection, state_schema: str) -> None:
    execute(
        target,
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.deferred_indexes (slot text, table_name text, index_name text,"
            " kind text NOT NULL DEFAULT 'index', definition text NOT NULL, PRIMARY KEY (slot, table_name, index_name))"
        ).format(sql.Identifier(state_schema)),
    )


def defer_indexes(target: Connection, state_schema: str, slot: str, table: TableInfo) -> list[str]:
    """Record and drop the table's deferrable indexes and constraints; returns their names."""
    if table.relkind != "r":
        return []
    rows = fetch_all(target, _CANDIDATES, {"schema": table.name.schema, "table": table.name.name})
    for kind, name, definition in rows:
        if kind == "index":
            drop = sql.SQL("DROP INDEX {}").format(sql.Identifier(table.name.schema, name))
        else:
            drop = sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(table.name.ident, sql.Identifier(name))
        execute(target, "BEGIN")
        try:
            execute(
                target,
                sql.SQL(
                    "INSERT INTO {}.deferred_indexes (slot, table_name, index_name, kind, definition)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(sql.Identifier(state_schema)),
                (slot, table.name.regclass, name, kind, definition),
            )
            execute(target, drop)
            execute(target, "COMMIT")
        except BaseException:
            execute(target, "ROLLBACK")
            raise
    return [name for _, name, _ in rows]


def restore_indexes(target: Connection, state_schema: str, slot: str, table: TableName | None) -> list[str]:
    """Recreate recorded indexes and constraints (of one table, or all) that are missing."""
    if not fetch_value(target, "SELECT to_regclass(%s)", (f"{state_schema}.deferred_indexes",)):
        return []
    # Constraints (primary keys) first; NULL table_name selects every table.
    query = sql.SQL(
        "SELECT table_name, index_name, kind, definition FROM {}.deferred_indexes"
        " WHERE slot = %s AND (%s::text IS NULL OR table_name = %s) ORDER BY kind DESC, index_name"
    ).format(sql.Identifier(state_schema))
    wanted = None if table is None else table.regclass
    params = [slot, wanted, wanted]
    restored: list[str] = []
    for table_name, name, kind, definition in fetch_all(target, query, params):
        owner = _owner(table_name)
        if fetch_value(target, "SELECT to_regclass(%s)", (owner.regclass,)) and not _present(target, owner, name, kind):
            # Definitions come from pg_get_indexdef / pg_get_constraintdef: server-generated, names quoted.
            if kind == "index":
                execute(target, sql.SQL(definition))
            else:
                execute(
                    target,
                    sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(owner.ident, sql.Identifier(name))
                    + sql.SQL(definition),
                )
            restored.append(f"{kind} {name}")
        execute(
            target,
            sql.SQL("DELETE FROM {}.deferred_indexes WHERE slot = %s AND table_name = %s AND index_name = %s").format(
                sql.Identifier(state_schema)
            ),
            (slot, table_name, name),
        )
    return restored


_QUOTED = re.compile(r'^"((?:[^"]|"")*)"\."((?:[^"]|"")*)"$')


def _owner(recorded: str) -> TableName:
    """The table a record belongs to: recorded in its quoted form, as dots may appear in any name."""
    match = _QUOTED.match(recorded)
    if match is None:
        return TableName.parse(recorded)  # a record written before the quoted form
    return TableName(match.group(1).replace('""', '"'), match.group(2).replace('""', '"'))


def _present(target: Connection, table: TableName, name: str, kind: str) -> bool:
    if kind == "index":
        return fetch_value(target, "SELECT to_regclass(%s)", (TableName(table.schema, name).regclass,)) is not None
    return bool(
        fetch_value(
            target,
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s)",
            (table.regclass, name),
        )
    )
