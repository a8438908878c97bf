"""Table names and table selection (pure: no database access)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from psycopg2 import sql


@dataclass(frozen=True, order=True)
class TableName:
    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        schema, _, name = text.partition(".")
        if not name:
            return cls("public", schema)
        return cls(schema, name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def regclass(self) -> str:
        """A value for `%s::regclass` / to_regclass(%s): quoted so any name survives the cast."""
        return '"{}"."{}"'.format(self.schema.replace('"', '""'), self.name.replace('"', '""'))

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def select_tables(candidates: Iterable[TableName], include: Iterable[str], exclude: Iterable[str]) -> list[TableName]:
    """Tables matching any include pattern and no exclude pattern, sorted.

    Patterns match 'schema.table' case-sensitively (PostgreSQL names are case-sensitive once quoted).
    """
    include = list(include)
    exclude = list(exclude)
    chosen = [
        t
        for t in candidates
        if any(fnmatch.fnmatchcase(str(t), p) for p in include)
        and not any(fnmatch.fnmatchcase(str(t), p) for p in exclude)
    ]
    return sorted(set(chosen))


def unmatched_patterns(candidates: Iterable[TableName], include: Iterable[str]) -> list[str]:
    """Include patterns that match no table: almost always a typo the user wants to hear about."""
    names = [str(t) for t in candidates]
    return [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in names)]
