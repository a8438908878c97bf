"""What the catalog says about tables, columns, keys and sequences (read-only queries)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lambdas.core.db import Connection, fetch_all
from lambdas.core.tables import TableName

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")
# The product's own schema (cutover state, copy state, the dms engine's fence markers): never migrated.
OWN_SCHEMA = "_zdm"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. 'numeric(12,2)'
    not_null: bool
    has_default: bool = False
    generated: bool = False  # GENERATED ALWAYS AS (...) STORED: computed, never copied
    composite: bool = False  # of a composite (row) type, or an array of one


@dataclass(frozen=True)
class TableInfo:
    name: TableName
    oid: int
    relkind: str  # 'r' table, 'p' partitioned
    persistence: str  # 'p' permanent, 'u' unlogged, 't' temporary
    replica_identity: str  # 'd' default (pk), 'i' index, 'f' full, 'n' nothing
    primary_key: tuple[str, ...]
    replica_identity_index: str | None
    columns: tuple[Column, ...]
    estimated_rows: int
    size_bytes: int
    partition_parent: TableName | None = None
    key_types: tuple[str, ...] = field(default=())
    ancestor_oids: tuple[int, ...] = field(default=())  # parents, their parents, ... (pg_inherits)
    is_partition: bool = False  # partition_parent is a partitioned table (else plain inheritance, or none)
    # Plain-inheritance children (not partitions): their rows are theirs, not this table's (copied with ONLY).
    inheritance_children: tuple[TableName, ...] = field(default=())
    # A DEFERRABLE primary key: PostgreSQL never uses a non-immediate index as replica identity.
    primary_key_deferrable: bool = False
    # row_security_active() for the reading role: its policies hide rows from it (it neither owns the table
    # without FORCE ROW LEVEL SECURITY nor has BYPASSRLS), so a copy or a compare would silently see fewer.
    row_security_active: bool = False
    readable: bool = True  # the connection's role may SELECT from it

    @property
    def has_usable_identity(self) -> bool:
        """Whether UPDATE/DELETE can be replicated (and still run on the source once published)."""
        if self.replica_identity == "f":
            return True
        if self.replica_identity == "i":
            return self.replica_identity_index is not None
        if self.replica_identity == "d":
            return bool(self.primary_key) and not self.primary_key_deferrable
        return False


def list_tables(conn: Connection) -> list[TableName]:
    """Every ordinary and partitioned table outside the system schemas and the product's own."""
    rows = fetch_all(
        conn,
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN %s AND n.nspname NOT LIKE 'pg_temp%%'"
        " AND n.nspname NOT LIKE 'pg_toast%%'",
        ((*SYSTEM_SCHEMAS, OWN_SCHEMA),),
    )
    return sorted(TableName(s, t) for s, t in rows)


def describe_tables(conn: Connection, tables: Iterable[TableName]) -> dict[TableName, TableInfo]:
    """Catalog facts for `tables` that exist; missing tables are simply absent from the result."""
    names = list(tables)
    if not names:
        return {}
    rows = fetch_all(
        conn,
        """
        WITH wanted(schema_name, table_name) AS (SELECT * FROM unnest(%s::text[], %s::text[]))
        SELECT n.nspname, c.relname, c.oid, c.relkind, c.relpersistence, c.relreplident,
               greatest(c.reltuples, 0)::bigint,
               pg_total_relation_size(c.oid),
               (SELECT array_agg(a.attname ORDER BY k.ord)
                  FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary),
               (SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
                  FROM pg_index i, unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary),
               (SELECT ic.relname FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                 WHERE i.indrelid = c.oid AND i.indisreplident),
               (SELECT ARRAY[pn.nspname, pc.relname] FROM pg_inherits h
                  JOIN pg_class pc ON pc.oid = h.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                 WHERE h.inhrelid = c.oid LIMIT 1),
               (WITH RECURSIVE up(oid) AS (
                    SELECT h.inhparent FROM pg_inherits h WHERE h.inhrelid = c.oid
                    UNION SELECT h.inhparent FROM pg_inherits h JOIN up ON h.inhrelid = up.oid)
                SELECT array_agg(oid::bigint) FROM up),
               c.relispartition,
               (SELECT array_agg(ARRAY[kn.nspname, kc.relname] ORDER BY kn.nspname, kc.relname) FROM pg_inherits h
                  JOIN pg_class kc ON kc.oid = h.inhrelid JOIN pg_namespace kn ON kn.oid = kc.relnamespace
                 WHERE h.inhparent = c.oid AND NOT kc.relispartition),
               coalesce((SELECT NOT i.indimmediate FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), false),
               c.relrowsecurity AND row_security_active(c.oid),
               has_table_privilege(c.oid, 'SELECT')
          FROM wanted w
          JOIN pg_namespace n ON n.nspname = w.schema_name
          JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.table_name AND c.relkind IN ('r', 'p')
        """,
        ([t.schema for t in names], [t.name for t in names]),
    )
    columns = _columns(conn, [r[2] for r in rows])
    result: dict[TableName, TableInfo] = {}
    for (
        schema,
        name,
        oid,
        relkind,
        persistence,
        replident,
        est,
        size,
        pk,
        pk_types,
        ri_index,
        parent,
        ancestors,
        is_partition,
        children,
        pk_deferrable,
        rls_active,
        readable,
    ) in rows:
        table = TableName(schema, name)
        result[table] = TableInfo(
            name=table,
            oid=oid,
            relkind=relkind,
            persistence=persistence,
            replica_identity=replident,
            primary_key=tuple(pk or ()),
            replica_identity_index=ri_index,
            columns=tuple(columns.get(oid, ())),
            estimated_rows=int(est),
            size_bytes=int(size),
            partition_parent=TableName(parent[0], parent[1]) if parent else None,
            key_types=tuple(pk_types or ()),
            ancestor_oids=tuple(int(a) for a in ancestors or ()),
            is_partition=bool(is_partition),
            inheritance_children=tuple(TableName(k[0], k[1]) for k in children or ()),
            primary_key_deferrable=bool(pk_deferrable),
            row_security_active=bool(rls_active),
            readable=bool(readable),
        )
    return result


@dataclass(frozen=True)
class Partition:
    """A partition at any level under a partitioned table: its direct parent and its bound as SQL
    (`FOR VALUES ...`, or `DEFAULT`)."""

    name: TableName
    parent: TableName
    bound: str


def partition_trees(conn: Connection, roots: Iterable[TableName]) -> dict[TableName, list[Partition]]:
    """Every partition under each of `roots` (partitioned tables), at every level (pg_inherits, so
    PostgreSQL 10 and 11 too)."""
    names = list(roots)
    if not names:
        return {}
    rows = fetch_all(
        conn,
        """
        WITH RECURSIVE wanted(schema_name, table_name) AS (SELECT * FROM unnest(%s::text[], %s::text[])),
        tree(root, relid) AS (
            SELECT c.oid, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN wanted w ON w.schema_name = n.nspname AND w.table_name = c.relname
            WHERE c.relkind = 'p'
            UNION ALL
            SELECT t.root, i.inhrelid FROM tree t JOIN pg_inherits i ON i.inhparent = t.relid
        )
        SELECT rn.nspname, r.relname, cn.nspname, c.relname, pn.nspname, p.relname, pg_get_expr(c.relpartbound, c.oid)
        FROM tree t
        JOIN pg_class r ON r.oid = t.root JOIN pg_namespace rn ON rn.oid = r.relnamespace
        JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace cn ON cn.oid = c.relnamespace
        JOIN pg_inherits i ON i.inhrelid = c.oid
        JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
        WHERE t.relid <> t.root AND c.relispartition
        ORDER BY 1, 2, 3, 4
        """,
        ([n.schema for n in names], [n.name for n in names]),
    )
    trees: dict[TableName, list[Partition]] = {}
    for root_schema, root, schema, name, parent_schema, parent, bound in rows:
        trees.setdefault(TableName(root_schema, root), []).append(
            Partition(TableName(schema, name), TableName(parent_schema, parent), str(bound))
        )
    return trees


def _columns(conn: Connection, oids: list[int]) -> dict[int, list[Column]]:
    if not oids:
        return {}
    rows = fetch_all(
        conn,
        "SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef,"
        " a.attgenerated <> '', coalesce(e.typtype, t.typtype) = 'c'"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'"
        " WHERE a.attrelid = ANY(%s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attrelid, a.attnum",
        (oids,),
    )
    out: dict[int, list[Column]] = {}
    for oid, name, typ, not_null, has_default, generated, composite in rows:
        out.setdefault(oid, []).append(Column(name, typ, not_null, has_default, generated, composite))
    return out


@dataclass(frozen=True)
class SequenceUse:
    """A sequence a selected table draws from: owned by a column (serial/identity) or only named in a default."""

    sequence: TableName
    table: TableName
    column: str
    owned: bool


def sequences_for_tables(conn: Connection, tables: Iterable[TableName]) -> list[SequenceUse]:
    names = list(tables)
    if not names:
        return []
    rows = fetch_all(
        conn,
        """
        WITH wanted(schema_name, table_name) AS (SELECT * FROM unnest(%s::text[], %s::text[])),
        rels AS (
            SELECT c.oid, n.nspname, c.relname FROM wanted w
              JOIN pg_namespace n ON n.nspname = w.schema_name
              JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = w.table_name
        ),
        owned AS (  -- serial and identity columns: the sequence depends on the column
            SELECT d.objid AS seq, r.nspname, r.relname, a.attname, true AS owned
              FROM rels r JOIN pg_depend d ON d.refobjid = r.oid AND d.classid = 'pg_class'::regclass
                          AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
              JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = d.refobjsubid
        ),
        in_defaults AS (  -- nextval('seq') in a column default: the default depends on the sequence
            SELECT d.refobjid AS seq, r.nspname, r.relname, a.attname, false AS owned
              FROM rels r JOIN pg_attrdef ad ON ad.adrelid = r.oid
              JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                              AND d.refclassid = 'pg_class'::regclass
              JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
              JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum = ad.adnum
        )
        SELECT DISTINCT ON (u.seq, u.nspname, u.relname, u.attname)
               sn.nspname, sc.relname, u.nspname, u.relname, u.attname,
               EXISTS (SELECT 1 FROM owned o WHERE o.seq = u.seq)
          FROM (SELECT * FROM owned UNION ALL SELECT * FROM in_defaults) u
          JOIN pg_class sc ON sc.oid = u.seq JOIN pg_namespace sn ON sn.oid = sc.relnamespace
         ORDER BY u.seq, u.nspname, u.relname, u.attname
        """,
        ([t.schema for t in names], [t.name for t in names]),
    )
    return sorted(
        (SequenceUse(TableName(ss, sn), TableName(ts, tn), col, bool(owned)) for ss, sn, ts, tn, col, owned in rows),
        key=lambda u: (u.sequence, u.table, u.column),
    )
