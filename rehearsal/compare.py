"""Row-for-row comparison of tables on two servers: the ground truth tests and reports rely on.

Deliberately simple and independent of the product's validator (which it can then check):
both sides stream (primary key, md5 of the whole row) in key order and are merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from psycopg2 import sql

from lambdas.core.catalog import describe_tables
from lambdas.core.db import Connection, execute, unbound_session
from lambdas.core.tables import TableName

# One definition of the settings that change a row's text form, shared with the validator.
from lambdas.core.textform import TEXT_FORM_SETTINGS, pin_text_form

__all__ = ["TEXT_FORM_SETTINGS", "TableDiff", "compare_databases", "compare_table", "pin_text_form"]


@dataclass
class TableDiff:
    table: str
    source_rows: int = 0
    target_rows: int = 0
    missing_on_target: list[str] = field(default_factory=list)
    extra_on_target: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing_on_target or self.extra_on_target or self.changed)


def _stream(conn: Connection, table: TableName, key: Sequence[str], batch: int = 20_000) -> Iterator[tuple[str, str]]:
    # Columns are qualified and the whole row is ROW(t.*), so a column named like an alias (t, k, x)
    # cannot stand in for the row or the key. With no key, the whole row is the key: a multiset
    # compare (a duplicate row on one side only shows as missing or extra).
    if key:
        key_expr: sql.Composable = (
            sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier("t", k) for k in key))
            if len(key) > 1
            else sql.SQL("({})::text").format(sql.Identifier("t", key[0]))
        )
    else:
        key_expr = sql.SQL("ROW(t.*)::text")
    # Ordered by the key's text in byte order ("C"), which is also Python's str order, so the
    # merge below sees the same order on both sides whatever the key's type or collation.
    query = sql.SQL(
        'SELECT x.k, md5(ROW(t.*)::text) FROM {table} t, LATERAL (SELECT {key} COLLATE "C" AS k) x ORDER BY 1'
    ).format(key=key_expr, table=table.ident)
    with conn.cursor(name=f"cmp_{table.name}") as cur:
        cur.itersize = batch
        cur.execute(query)
        for row in cur:
            yield row[0], row[1]


def compare_table(source: Connection, target: Connection, table: TableName, key: Sequence[str]) -> TableDiff:
    diff = TableDiff(str(table))
    src, tgt = _stream(source, table, key), _stream(target, table, key)
    s, t = next(src, None), next(tgt, None)
    while s is not None or t is not None:
        if t is None or (s is not None and s[0] < t[0]):
            assert s is not None
            diff.source_rows += 1
            diff.missing_on_target.append(s[0])
            s = next(src, None)
        elif s is None or t[0] < s[0]:
            diff.target_rows += 1
            diff.extra_on_target.append(t[0])
            t = next(tgt, None)
        else:
            diff.source_rows += 1
            diff.target_rows += 1
            if s[1] != t[1]:
                diff.changed.append(s[0])
            s, t = next(src, None), next(tgt, None)
    return diff


@dataclass
class Snapshot:
    """Both databases as of one instant: repeatable-read transactions opened together
    (open them while clients are held, and the two sides show the same moment)."""

    source: Connection
    target: Connection

    @classmethod
    def take(cls, source_dsn: str, target_dsn: str, application_name: str = "zdm-compare") -> Snapshot:
        from lambdas.core.db import connect

        conns = []
        for dsn in (source_dsn, target_dsn):
            conn = connect(dsn, autocommit=False, application_name=application_name)
            execute(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            execute(conn, "SET row_security = off")  # rows a policy hides fail the compare, never vanish from it
            unbound_session(conn)
            pin_text_form(conn)  # the first query fixes the snapshot
            conns.append(conn)
        return cls(conns[0], conns[1])

    def diffs(self, tables: Sequence[TableName]) -> list[TableDiff]:
        """Row-for-row comparison of `tables`; closes both sessions."""
        try:
            infos = describe_tables(self.source, tables)
            return [compare_table(self.source, self.target, t, infos[t].primary_key) for t in tables]
        finally:
            self.source.close()
            self.target.close()


def compare_databases(source_dsn: str, target_dsn: str, tables: Sequence[TableName]) -> list[TableDiff]:
    """Row-for-row comparison of `tables`, each side in one repeatable-read snapshot."""
    return Snapshot.take(source_dsn, target_dsn).diffs(tables)
