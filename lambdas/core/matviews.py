"""Materialized views: neither the copy nor replication fills them, so the target's are refreshed before reads move.

A schema restored with `pg_dump --schema-only` creates every materialized view WITH NO DATA: reads sent to
the target would fail ("materialized view ... has not been populated"). One created WITH DATA before the copy
holds the result over empty tables: reads would get wrong answers without an error. After the copy has
been validated, each selected view that the source holds populated is refreshed on the target, views
before the views built on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from psycopg2 import sql

from lambdas.core.catalog import OWN_SCHEMA, SYSTEM_SCHEMAS
from lambdas.core.db import Connection, execute, fetch_all, unbound_session
from lambdas.core.tables import TableName, select_tables


@dataclass(frozen=True)
class MaterializedView:
    name: TableName
    populated: bool
    owned: bool  # the session's role may refresh it (is, or is a member of, its owner)


@dataclass(frozen=True)
class ViewRefresh:
    name: TableName
    refreshed: bool  # False: left unpopulated, as the source holds it
    seconds: float


class MaterializedViewsMissing(RuntimeError):
    """Selected views the source has and the target lacks (the schema was restored without them)."""


def list_materialized_views(conn: Connection) -> list[MaterializedView]:
    """Every materialized view outside the system schemas, each after the views it is built on (through
    plain views too), so that refreshing in this order reads fresh inputs."""
    rows = fetch_all(
        conn,
        "SELECT c.oid, n.nspname, c.relname, c.relkind, c.relispopulated, pg_has_role(c.relowner, 'USAGE')"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('m', 'v') AND n.nspname NOT IN %s AND n.nspname NOT LIKE 'pg_temp%%'",
        ((*SYSTEM_SCHEMAS, OWN_SCHEMA),),
    )
    edges = fetch_all(
        conn,
        # a view's query is its rewrite rule; the rule depends on each relation the query reads
        "SELECT DISTINCT r.ev_class, d.refobjid FROM pg_rewrite r"
        " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid"
        " AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class"
        " JOIN pg_class ref ON ref.oid = d.refobjid AND ref.relkind IN ('m', 'v')",
    )
    nodes = {
        int(oid): (TableName(schema, name), kind, bool(populated), bool(owned))
        for oid, schema, name, kind, populated, owned in rows
    }
    inputs: dict[int, set[int]] = {oid: set() for oid in nodes}
    for view, ref in edges:
        if int(view) in inputs and int(ref) in nodes:
            inputs[int(view)].add(int(ref))
    return [
        MaterializedView(name, populated, owned)
        for oid in _inputs_first(inputs, key=lambda o: nodes[o][0])
        for name, kind, populated, owned in [nodes[oid]]
        if kind == "m"
    ]


def _inputs_first(inputs: Mapping[int, set[int]], key: Callable[[int], TableName]) -> list[int]:
    """Every node after its inputs; ties in name order so that the order is the same on every run."""
    order: list[int] = []
    done: set[int] = set()

    def visit(node: int, path: frozenset[int]) -> None:
        if node in done or node in path:  # a cycle cannot be created in PostgreSQL; never loop on one
            return
        for before in sorted(inputs[node], key=key):
            visit(before, path | {node})
        done.add(node)
        order.append(node)

    for node in sorted(inputs, key=key):
        visit(node, frozenset())
    return order


def selected_views(
    views: Iterable[MaterializedView], include: Iterable[str], exclude: Iterable[str]
) -> list[MaterializedView]:
    """The views the migration's table patterns match (`schema.name`, as for tables), in refresh order."""
    chosen = set(select_tables((v.name for v in views), include, exclude))
    return [v for v in views if v.name in chosen]


def refresh_materialized_views(
    source: Connection, target: Connection, include: Sequence[str], exclude: Sequence[str]
) -> list[ViewRefresh]:
    """Refresh on the target every selected view the source holds populated, inputs first; a view the
    source holds unpopulated stays so. Safe to run again: a refresh recomputes the view from its tables."""
    unbound_session(target)  # a refresh is one statement as long as its query: the server's timeout must not cut it
    on_source = {v.name: v for v in selected_views(list_materialized_views(source), include, exclude)}
    on_target = selected_views(list_materialized_views(target), include, exclude)
    missing = sorted(set(on_source) - {v.name for v in on_target})
    if missing:
        raise MaterializedViewsMissing(
            f"materialized view(s) {', '.join(map(str, missing))} exist on the source but not on the target: "
            "create them there (pg_dump --schema-only restores them) and run the migration again"
        )
    results: list[ViewRefresh] = []
    for view in on_target:
        if view.name not in on_source:
            continue  # the target's own: not the migration's to touch
        if not on_source[view.name].populated:
            results.append(ViewRefresh(view.name, refreshed=False, seconds=0.0))
            continue
        started = time.monotonic()
        execute(target, sql.SQL("REFRESH MATERIALIZED VIEW {}").format(view.name.ident))
        results.append(ViewRefresh(view.name, refreshed=True, seconds=time.monotonic() - started))
    return results
