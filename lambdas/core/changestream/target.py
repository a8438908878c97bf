"""The target tables a change stream feeds: each table's key, columns and their conversions, and
which topic feeds which table (`StreamRouting`), read from the target's catalog."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lambdas.core.catalog import TableInfo, describe_tables
from lambdas.core.changestream import state
from lambdas.core.changestream.connector import heartbeat_topic, table_topic
from lambdas.core.changestream.convert import ColumnType, SqlConversion, placeholder_markers, sql_conversion
from lambdas.core.db import Connection
from lambdas.core.tables import TableName


@dataclass(frozen=True)
class TargetTable:
    name: TableName
    key: tuple[str, ...]
    columns: Mapping[str, ColumnType]  # the columns a change may write (generated ones excluded)
    generated: frozenset[str] = frozenset()
    # The source's columns among those: an insert or update must carry each (Debezium leaves out a column
    # of a type it does not know, which would be written as NULL); empty when not recorded.
    expected: frozenset[str] = frozenset()

    @cached_property
    def label(self) -> str:
        return str(self.name)

    @cached_property
    def plan(self) -> TablePlan:
        return TablePlan(self)


class TablePlan:
    """What applying a table's batches needs, worked out once per table: each column's conversion (in
    SQL, or in Python first), the forms of the placeholder to look for, the key, the statements."""

    def __init__(self, table: TargetTable) -> None:
        self.order = tuple(table.columns)
        self.full = frozenset(self.order)  # an event's columns, usually: every column is written
        self.full_generated = self.full | table.generated
        self.key_set = frozenset(table.key)
        self._key_values = operator.itemgetter(*table.key)  # one column: its value, else a tuple
        # float key columns: 0.0 and -0.0 are equal in Python (one fold key) but different values (a key
        # moving from one to the other is a delete and a create, which must not fold into one upsert)
        self._float_key = any(table.columns[k].sql_type in _FLOAT_TYPES for k in table.key if k in table.columns)
        self.conversions: dict[bool, dict[str, SqlConversion]] = {
            python: {n: sql_conversion(c, python=python) for n, c in table.columns.items()} for python in (False, True)
        }
        self.markers = placeholder_markers(table.columns.values())
        self.statements: dict[tuple[Any, ...], str] = {}

    def row_key(self, values: Mapping[str, Any]) -> Hashable:
        """The key columns' JSON values, to fold a row's changes by (a delete's and an upsert's alike)."""
        key: Hashable = self._key_values(values)
        if self._float_key:
            key = _signed_zeros(key)
        try:
            hash(key)
        except TypeError:  # an array (a JSON list) in the key
            key = json.dumps(key, sort_keys=True)
        return key

    def may_hold_placeholder(self, raw: bytes | None) -> bool:
        """Whether the record may carry the unchanged-TOAST placeholder: only then are its values checked."""
        if raw is None:
            return False
        return any(marker in raw for marker in self.markers)


_FLOAT_TYPES = frozenset({"double precision", "real"})


def _signed_zeros(key: Any) -> Any:
    if type(key) is float:
        return (key, math.copysign(1.0, key)) if key == 0.0 else key
    if type(key) is tuple:
        return tuple(_signed_zeros(k) for k in key)
    return key


@dataclass(frozen=True)
class StreamRouting:
    """Which target table each topic feeds, with the column types the conversion needs."""

    tables: Mapping[str, TargetTable]
    heartbeat_topic: str | None = None

    @property
    def topics(self) -> list[str]:
        return sorted(self.tables) + ([self.heartbeat_topic] if self.heartbeat_topic else [])

    @classmethod
    def for_topics(cls, target: Connection, prefix: str, topics: Iterable[str]) -> StreamRouting:
        """Routing for the table topics an event source delivers (<prefix>.<schema>.<table>)."""
        tables = []
        for topic in topics:
            schema, _, name = topic.removeprefix(prefix + ".").partition(".")
            if not topic.startswith(prefix + ".") or not name:
                raise ValueError(
                    f"topic {topic!r} is not a table topic of prefix {prefix!r} (<prefix>.<schema>.<table>)"
                )
            tables.append(TableName(schema, name))
        return cls.load(target, prefix, tables)

    @classmethod
    def load(cls, target: Connection, prefix: str, tables: Iterable[TableName]) -> StreamRouting:
        wanted = list(tables)
        infos = describe_tables(target, wanted)
        missing = [str(t) for t in wanted if t not in infos]
        if missing:
            raise ValueError(f"target tables missing: {', '.join(missing)}; create the schema on the target first")
        routed: dict[str, TargetTable] = {}
        on_source = state.source_columns(target)
        for name in wanted:
            info = infos[name]
            if not info.primary_key:
                raise ValueError(
                    f"table {name} has no primary key: the debezium engine upserts and deletes by key;"
                    " add one or use engine 'logical'"
                )
            routed[table_topic(prefix, name)] = _target_table(info, on_source.get(str(name), frozenset()))
        if not target.autocommit:
            target.rollback()
        return cls(routed, heartbeat_topic(prefix))

    def reload(self, target: Connection, table: TargetTable) -> TargetTable:
        """`table` as the target's catalog describes it now (in the caller's transaction), routed from now on:
        a column added on the target since the routing was read. The same table when it is gone or keyless."""
        info = describe_tables(target, [table.name]).get(table.name)
        if info is None or not info.primary_key:
            return table
        fresh = _target_table(info, table.expected)
        if isinstance(self.tables, dict):
            for topic, known in list(self.tables.items()):
                if known is table:
                    self.tables[topic] = fresh
        return fresh


def _target_table(info: TableInfo, source_columns: frozenset[str]) -> TargetTable:
    columns = {c.name: ColumnType.of(c.type) for c in info.columns if not c.generated}
    return TargetTable(
        name=info.name,
        key=info.primary_key,
        columns=columns,
        generated=frozenset(c.name for c in info.columns if c.generated),
        expected=source_columns & columns.keys(),
    )
