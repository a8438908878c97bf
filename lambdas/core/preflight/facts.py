"""Facts the preflight needs, read from the source and target connections (all the SQL I/O).

Everything here only reads: no object is created, no setting changed. Queries a role may not be
allowed to run are guarded by a privilege test first and their fact becomes None ("unknown"),
so a weakly privileged role still gets a full report instead of an exception half-way.
"""

from __future__ import annotations

import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from psycopg2 import sql

from lambdas.core.catalog import SequenceUse, TableInfo, describe_tables, list_tables, sequences_for_tables
from lambdas.core.db import Connection, fetch_all, fetch_one, fetch_value, settable
from lambdas.core.engines.slot_creation import BlockingTransaction
from lambdas.core.fence import is_fenced, role_overrides
from lambdas.core.lsn import Lsn, current_lsn, origin_progress_readable
from lambdas.core.matviews import MaterializedView, list_materialized_views
from lambdas.core.statement_logging import LogSetting, log_settings
from lambdas.core.tables import TableName, select_tables, unmatched_patterns

# Rows counted (at most) in a non-empty target table: enough to tell "a few test rows" from "real data"
# without scanning a big table.
TARGET_ROW_COUNT_CAP = 1000
# Large objects counted at most (pg_largeobject_metadata can be huge).
LARGE_OBJECT_COUNT_CAP = 10_000
# Tables per batched query (EXISTS probes, privilege tests).
_BATCH = 200

# Roles whose membership matters: RDS's replication and superuser stand-ins, PG16's subscription right.
INTERESTING_ROLES = ("rds_replication", "rds_superuser", "pg_create_subscription", "pg_signal_backend")

# pg_stat_activity.backend_type values that are not background workers (they do not use max_worker_processes).
_NON_BGWORKER_TYPES = (
    "client backend",
    "autovacuum launcher",
    "autovacuum worker",
    "background writer",
    "checkpointer",
    "walwriter",
    "walsender",
    "walreceiver",
    "walsummarizer",
    "startup",
    "archiver",
    "logger",
    "standalone backend",
    "slotsync worker",
    "io worker",
)

_SETTINGS = (
    "wal_level",
    "max_replication_slots",
    "max_wal_senders",
    "max_logical_replication_workers",
    "max_sync_workers_per_subscription",
    "max_worker_processes",
    "max_slot_wal_keep_size",
    "rds.logical_replication",
)

_UNIT_RE = re.compile(r"^(\d*)\s*(B|kB|MB|GB|TB)$")
_UNIT_BYTES = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass(frozen=True)
class ServerVersion:
    num: int  # server_version_num, e.g. 150004
    text: str  # server_version, e.g. '15.4 (Debian 15.4-1)'

    @property
    def major(self) -> int:
        return self.num // 10000 if self.num >= 100000 else self.num // 100


@dataclass(frozen=True)
class RoleFacts:
    name: str
    superuser: bool
    replication: bool
    member_of: frozenset[str]  # those of INTERESTING_ROLES the role is a member of
    can_create_in_database: bool
    owns_database: bool = False  # member of the database owner's role (ALTER DATABASE: the fence)
    # session_replication_role = replica: the parallel copy and the change-stream applier write with it
    # (superuser only unless GRANT SET ON PARAMETER, PostgreSQL 15+; probed, as managed servers have rules)
    can_set_replication_role: bool = True
    # pg_replication_origin_progress: how far a subscription on this server applied (superuser only unless granted)
    can_read_origin_progress: bool = True


@dataclass(frozen=True)
class ConnectionFacts:
    """Client sessions: the server's limit and the slots it keeps for superusers, the role's and the
    database's CONNECTION LIMIT (-1: none), and how many sessions each has open now (this one included)."""

    max_connections: int = 100
    reserved: int = 3  # superuser_reserved_connections, plus reserved_connections (PostgreSQL 16)
    used: int = 1  # client backends
    role_limit: int = -1
    role_used: int = 1
    database_limit: int = -1
    database_used: int = 1


_CONNECTIONS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
         + coalesce(current_setting('reserved_connections', true)::int, 0),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       r.rolconnlimit, (SELECT count(*) FROM pg_stat_activity WHERE usename = current_user)::int,
       d.datconnlimit, (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database())::int
  FROM pg_roles r, pg_database d
 WHERE r.rolname = current_user AND d.datname = current_database()
"""


@dataclass(frozen=True)
class ServerFacts:
    """Settings, capacity and rights of one server, as seen by the connection's role."""

    version: ServerVersion
    database: str
    wal_level: str
    is_rds: bool  # the server has the rds.logical_replication setting
    max_replication_slots: int
    max_wal_senders: int
    max_logical_replication_workers: int
    max_sync_workers_per_subscription: int
    max_worker_processes: int
    max_slot_wal_keep_size: int | None  # bytes; None = unlimited (-1, or before PG13)
    slots_used: int
    wal_senders_used: int
    background_workers_used: int
    logical_workers_used: int
    origins_used: int | None  # None: pg_replication_origin not readable by this role
    role: RoleFacts
    extensions: dict[str, str]  # installed in the database: name -> version
    available_extensions: frozenset[str]  # installable on the server
    large_objects: int | None  # capped at LARGE_OBJECT_COUNT_CAP; None: not readable
    # Writers a read-only fence does not stop (see fence.take_fence): enabled subscriptions applying
    # into this database, and two-phase transactions prepared in it and not yet resolved.
    subscriptions: tuple[str, ...] = ()
    prepared_transactions: int = 0
    encoding: str = "UTF8"  # the database's server encoding
    # The database is read-only by default (ALTER DATABASE ... SET default_transaction_read_only = on):
    # a fence (fence.take_fence) that a cutover, or a rollback after it, leaves in place on purpose.
    fenced: bool = False
    # Roles with their own default_transaction_read_only (ALTER ROLE ... SET): the fence refuses while they exist.
    read_only_overrides: tuple[str, ...] = ()
    # The settings under which the server keeps a statement's text (CREATE SUBSCRIPTION's holds a password),
    # their values, and whether this role may switch them off for its session.
    statement_logging: tuple[LogSetting, ...] = ()
    # Transactions a new replication slot on this server would wait for (`engines.slot_creation`): sessions
    # that hold a transaction id and have been open longer than LONG_TRANSACTION_SECONDS, and every prepared
    # transaction (of any database: a slot waits for them all). Others' sessions only if the role may see them.
    open_write_transactions: tuple[BlockingTransaction, ...] = ()
    sees_all_sessions: bool = True  # superuser or pg_read_all_stats: other roles' transactions are visible
    connections: ConnectionFacts = field(default_factory=ConnectionFacts)
    materialized_views: tuple[MaterializedView, ...] = ()  # in refresh order (inputs first)


@dataclass(frozen=True)
class OutsideReference:
    """A foreign key from a selected table to a table that is not migrated, and that table on the target."""

    table: TableName
    constraint: str
    referenced: TableName
    on_target: str  # 'missing', 'empty', 'has rows' or 'unreadable'


@dataclass(frozen=True)
class TableFacts:
    """The table selection and what both catalogs say about the selected tables."""

    include: list[str]
    exclude: list[str]
    candidates: list[TableName]  # every table on the source
    selected: list[TableName]
    unmatched_include: list[str]
    source: dict[TableName, TableInfo]
    target: dict[TableName, TableInfo]  # selected tables that exist on the target
    target_rows: dict[TableName, int]  # non-empty target tables: rows, counted up to TARGET_ROW_COUNT_CAP + 1
    target_unreadable: list[TableName]  # target tables the target role may not SELECT from
    source_not_owned: list[TableName]  # selected tables the source role does not own
    source_unreadable: list[TableName]  # selected tables the source role may not SELECT from
    sequences: list[SequenceUse]
    copy_bytes: int  # on-disk size of the selected tables, partitions of selected roots included
    # Partitions (any level) of selected partitioned tables that are not selected themselves: they are
    # published through their root, and UPDATE/DELETE on each needs its own replica identity.
    partitions: dict[TableName, TableInfo] = field(default_factory=dict)
    source_unreadable_sequences: list[TableName] = field(default_factory=list)
    target_missing_sequences: list[TableName] = field(default_factory=list)
    target_unwritable_sequences: list[TableName] = field(default_factory=list)  # no SELECT and UPDATE (setval)
    # CHECK, UNIQUE and EXCLUDE constraints the target has and the source does not: "table: definition"
    target_only_constraints: list[str] = field(default_factory=list)
    # User triggers set ENABLE ALWAYS or ENABLE REPLICA on the selected tables: they fire when replication
    # writes (session_replication_role = replica), on the target during the copy and apply, on the
    # source once the replication back runs. "table: trigger (ENABLE ALWAYS)"
    source_replica_triggers: list[str] = field(default_factory=list)
    target_replica_triggers: list[str] = field(default_factory=list)
    # Foreign keys of selected tables (on the source) to tables that are not migrated (neither selected nor
    # read through a selected partitioned ancestor).
    references_outside: list[OutsideReference] = field(default_factory=list)
    # Engine debezium only (`values_sent_wrongly`): values it sends wrongly without an error, and the tables
    # not scanned in time
    sent_wrongly: SentWrongly | None = None


@dataclass(frozen=True)
class WalSample:
    start: Lsn
    end: Lsn
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        if self.seconds <= 0:
            return 0.0
        return max(0, self.end - self.start) / self.seconds


@dataclass(frozen=True)
class PreflightFacts:
    source: ServerFacts
    target: ServerFacts
    tables: TableFacts
    wal: WalSample
    free_disk_bytes: int | None  # free space where the source keeps its WAL; None = unknown
    engine: str = "logical"  # 'logical', 'dms' or 'debezium'
    copy_method: str = "parallel-snapshot"
    expected_copy_mb_per_s: float = 50.0
    own_subscriptions: tuple[str, ...] = ()  # the migration's own (forward, back): not outside writers
    # Slots named as the migration's (forward on the source, back on the target) that belong to another
    # database of the server: starting would drop them. "side: slot (database db)"
    foreign_slots: tuple[str, ...] = ()
    # The migration's own replication objects, left by an earlier execution (`replication_left`)
    replication_left: tuple[str, ...] = ()
    copy_time_limit_seconds: float | None = None  # the parallel copy's time limit on AWS (one function run)
    copy_workers: int = 4  # logical.copy_workers: session pairs of the parallel copy
    validation_sessions: int = 8  # validation.max_parallel_chunks (0: no validation): one session a side each


class DiskProbe(ABC):
    """Tells how much disk is free where a server keeps its WAL."""

    @abstractmethod
    def free_bytes(self, conn: Connection) -> int | None:
        """Free bytes, or None when it cannot be measured from here."""


class LocalDiskProbe(DiskProbe):
    """Measures the server's data directory (its pg_wal if visible) when it is on this machine.

    Returns None for remote servers (RDS), when the role may not read data_directory, or when
    that path does not exist here.
    """

    def free_bytes(self, conn: Connection) -> int | None:
        data_directory = fetch_value(conn, "SELECT setting FROM pg_settings WHERE name = 'data_directory'")
        if not data_directory:
            return None
        host = conn.info.host or ""
        if host and not host.startswith("/") and host not in ("localhost", "127.0.0.1", "::1"):
            return None
        datadir = Path(data_directory)
        for path in (datadir / "pg_wal", datadir):
            try:
                if path.is_dir():
                    return int(shutil.disk_usage(path).free)
            except OSError:
                continue
        return None


def server_version(conn: Connection) -> ServerVersion:
    text = fetch_value(conn, "SHOW server_version")
    return ServerVersion(int(conn.server_version), str(text))


def _setting_bytes(value: str, unit: str | None) -> int | None:
    """A size setting in bytes; None for -1 (unlimited)."""
    number = int(value)
    if number < 0:
        return None
    match = _UNIT_RE.match(unit or "B")
    if not match:
        return number
    return number * int(match.group(1) or 1) * _UNIT_BYTES[match.group(2)]


def _count(conn: Connection, query: str, params: Sequence[object] | None = None) -> int:
    return int(fetch_value(conn, query, params) or 0)


def _can_select(conn: Connection, relation: str) -> bool:
    return bool(fetch_value(conn, "SELECT has_table_privilege(%s, 'SELECT')", (relation,)))


LONG_TRANSACTION_SECONDS = 60.0
_OPEN_WRITE_TRANSACTIONS = """
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''),
       extract(epoch FROM clock_timestamp() - xact_start)::float8, NULL
  FROM pg_stat_activity
 WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
   AND xact_start < clock_timestamp() - make_interval(secs => %(seconds)s)
UNION ALL
SELECT 0, owner::text, '', 'prepared', extract(epoch FROM clock_timestamp() - prepared)::float8, gid
  FROM pg_prepared_xacts
 ORDER BY 5 DESC, 1
 LIMIT 20
"""


def gather_server(conn: Connection, *, long_transaction_seconds: float = LONG_TRANSACTION_SECONDS) -> ServerFacts:
    version = server_version(conn)
    settings = {
        name: (setting, unit)
        for name, setting, unit in fetch_all(
            conn, "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(%s)", (list(_SETTINGS),)
        )
    }

    def integer(name: str, default: int = 0) -> int:
        return int(settings[name][0]) if name in settings else default

    keep = settings.get("max_slot_wal_keep_size")
    role_row = fetch_one(
        conn,
        "SELECT current_user, r.rolsuper, r.rolreplication, has_database_privilege(current_database(), 'CREATE'),"
        " pg_has_role(current_user, d.datdba, 'MEMBER'), pg_encoding_to_char(d.encoding)"
        " FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()",
    )
    assert role_row is not None  # the current role always exists
    member_of = frozenset(
        r[0]
        for r in fetch_all(
            conn,
            "SELECT r.rolname FROM pg_roles r WHERE r.rolname = ANY(%s) AND pg_has_role(current_user, r.oid, 'MEMBER')",
            (list(INTERESTING_ROLES),),
        )
    )
    origins_used = (
        _count(conn, "SELECT count(*) FROM pg_replication_origin")
        if _can_select(conn, "pg_catalog.pg_replication_origin")
        else None
    )
    large_objects = (
        _count(
            conn,
            "SELECT count(*) FROM (SELECT 1 FROM pg_largeobject_metadata LIMIT %s) lo",
            (LARGE_OBJECT_COUNT_CAP,),
        )
        if _can_select(conn, "pg_catalog.pg_largeobject_metadata")
        else None
    )
    return ServerFacts(
        version=version,
        database=str(fetch_value(conn, "SELECT current_database()")),
        wal_level=settings.get("wal_level", ("unknown", None))[0],
        is_rds="rds.logical_replication" in settings,
        max_replication_slots=integer("max_replication_slots"),
        max_wal_senders=integer("max_wal_senders"),
        max_logical_replication_workers=integer("max_logical_replication_workers"),
        max_sync_workers_per_subscription=integer("max_sync_workers_per_subscription", 2),
        max_worker_processes=integer("max_worker_processes", 8),
        max_slot_wal_keep_size=_setting_bytes(keep[0], keep[1]) if keep else None,
        slots_used=_count(conn, "SELECT count(*) FROM pg_replication_slots"),
        wal_senders_used=_count(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"),
        background_workers_used=_count(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type <> ALL(%s)",
            (list(_NON_BGWORKER_TYPES),),
        ),
        logical_workers_used=_count(
            conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'logical replication %%worker'"
        ),
        origins_used=origins_used,
        role=RoleFacts(
            name=str(role_row[0]),
            superuser=bool(role_row[1]),
            replication=bool(role_row[2]),
            member_of=member_of,
            can_create_in_database=bool(role_row[3]),
            owns_database=bool(role_row[4]),
            can_set_replication_role=settable(conn, [("session_replication_role", "replica")])[
                "session_replication_role"
            ],
            can_read_origin_progress=origin_progress_readable(conn),
        ),
        encoding=str(role_row[5]),
        read_only_overrides=tuple(role_overrides(conn)),
        fenced=is_fenced(conn),
        statement_logging=log_settings(conn),
        extensions={str(n): str(v) for n, v in fetch_all(conn, "SELECT extname, extversion FROM pg_extension")},
        available_extensions=frozenset(str(r[0]) for r in fetch_all(conn, "SELECT name FROM pg_available_extensions")),
        large_objects=large_objects,
        subscriptions=tuple(
            str(r[0])
            for r in fetch_all(
                conn,
                "SELECT subname FROM pg_subscription WHERE subenabled"
                " AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1",
            )
        ),
        prepared_transactions=_count(
            conn, "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
        ),
        open_write_transactions=tuple(
            BlockingTransaction(*row)
            for row in fetch_all(conn, _OPEN_WRITE_TRANSACTIONS, {"seconds": long_transaction_seconds})
        ),
        connections=ConnectionFacts(*(fetch_one(conn, _CONNECTIONS) or ())),
        materialized_views=tuple(list_materialized_views(conn)),
        sees_all_sessions=bool(
            fetch_value(
                conn,
                "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"
                " FROM pg_roles WHERE rolname = current_user",
            )
        ),
    )


def _batches(items: Sequence[TableInfo]) -> Iterable[Sequence[TableInfo]]:
    for start in range(0, len(items), _BATCH):
        yield items[start : start + _BATCH]


def _not_owned(conn: Connection, tables: Iterable[TableInfo]) -> list[TableName]:
    """The tables the role does not own."""
    infos = {t.oid: t.name for t in tables}
    if not infos:
        return []
    rows = fetch_all(
        conn,
        "SELECT c.oid FROM pg_class c WHERE c.oid = ANY(%s::oid[]) AND NOT pg_has_role(c.relowner, 'USAGE')",
        (list(infos),),
    )
    return sorted(infos[oid] for (oid,) in rows)


def _unreadable(tables: Iterable[TableInfo]) -> list[TableName]:
    """The tables the role may not SELECT from (`TableInfo.readable`, read with the catalog)."""
    return sorted(t.name for t in tables if not t.readable)


def _non_empty(conn: Connection, tables: Sequence[TableInfo]) -> dict[TableName, int]:
    """Row counts (capped) of the tables that hold any row; cheap EXISTS probes first."""
    non_empty: list[TableInfo] = []
    for batch in _batches(tables):
        # Our own position numbers go in as sql.Literal, not %s: a '%' in a table name would otherwise
        # be taken for a placeholder.
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}::int, EXISTS (SELECT 1 FROM {})").format(sql.Literal(i), t.name.ident)
            for i, t in enumerate(batch)
        )
        for index, has_rows in fetch_all(conn, query):
            if has_rows:
                non_empty.append(batch[index])
    counts: dict[TableName, int] = {}
    for batch in _batches(non_empty):
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}::int, (SELECT count(*) FROM (SELECT 1 FROM {} LIMIT {}) s)").format(
                sql.Literal(i), t.name.ident, sql.Literal(TARGET_ROW_COUNT_CAP + 1)
            )
            for i, t in enumerate(batch)
        )
        for index, rows in fetch_all(conn, query):
            counts[batch[index].name] = int(rows)
    return counts


def _copy_bytes(conn: Connection, tables: Iterable[TableInfo]) -> int:
    """Size of the tables plus every partition (or inheritance child) below them, each counted once."""
    oids = [t.oid for t in tables]
    if not oids:
        return 0
    return _count(
        conn,
        "WITH RECURSIVE tree(oid) AS ("
        " SELECT unnest(%s::oid[])"
        " UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)"
        " SELECT coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM tree",
        (oids,),
    )


def _partitions_below(
    conn: Connection, roots: Sequence[TableInfo], selected: Iterable[TableName]
) -> dict[TableName, TableInfo]:
    """Every partition, at any level, of the partitioned `roots`, except those in `selected`."""
    oids = [t.oid for t in roots if t.relkind == "p"]
    if not oids:
        return {}
    rows = fetch_all(
        conn,
        "WITH RECURSIVE tree(oid) AS (SELECT unnest(%s::oid[])"
        " UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)"
        " SELECT n.nspname, c.relname FROM tree JOIN pg_class c ON c.oid = tree.oid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relispartition",
        (oids,),
    )
    chosen = set(selected)
    return describe_tables(conn, [TableName(s, t) for s, t in rows if TableName(s, t) not in chosen])


def _sequence_rights(
    conn: Connection, sequences: Iterable[TableName], rights: Sequence[str]
) -> tuple[list[TableName], list[TableName]]:
    """(sequences missing here, sequences present but without every one of `rights` for this role)."""
    missing: list[TableName] = []
    lacking: list[TableName] = []
    for seq in sorted(set(sequences)):
        row = fetch_one(
            conn,
            "SELECT bool_and(has_sequence_privilege(c.oid, r)) FROM unnest(%s::text[]) r, pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'S' GROUP BY c.oid",
            (list(rights), seq.schema, seq.name),
        )
        if row is None:
            missing.append(seq)
        elif not row[0]:
            lacking.append(seq)
    return missing, lacking


_CONSTRAINTS = (
    "SELECT c.conrelid, pg_get_constraintdef(c.oid) FROM pg_constraint c"
    " WHERE c.conrelid = ANY(%s::oid[]) AND c.contype IN ('c', 'u', 'x')"
)


def _target_only_constraints(
    source: Connection, target: Connection, src: dict[TableName, TableInfo], tgt: dict[TableName, TableInfo]
) -> list[str]:
    """CHECK/UNIQUE/EXCLUDE constraints of target tables that the source table lacks (by definition)."""
    common = [t for t in src if t in tgt]
    if not common:
        return []
    on_source: dict[int, set[str]] = {}
    for oid, definition in fetch_all(source, _CONSTRAINTS, ([src[t].oid for t in common],)):
        on_source.setdefault(int(oid), set()).add(str(definition))
    found: list[str] = []
    by_oid = {tgt[t].oid: t for t in common}
    for oid, definition in fetch_all(target, _CONSTRAINTS, (list(by_oid),)):
        name = by_oid[int(oid)]
        if str(definition) not in on_source.get(src[name].oid, set()):
            found.append(f"{name}: {definition}")
    return sorted(found)


def gather_tables(source: Connection, target: Connection, include: list[str], exclude: list[str]) -> TableFacts:
    candidates = list_tables(source)
    selected = select_tables(candidates, include, exclude)
    source_info = describe_tables(source, selected)
    target_info = describe_tables(target, selected)
    sequences = sequences_for_tables(source, selected)
    used = [u.sequence for u in sequences]
    _, source_unreadable_sequences = _sequence_rights(source, used, ("SELECT",))
    target_missing_sequences, target_unwritable_sequences = _sequence_rights(target, used, ("SELECT", "UPDATE"))
    not_owned = _not_owned(source, source_info.values())
    source_unreadable, target_unreadable = _unreadable(source_info.values()), _unreadable(target_info.values())
    readable_target = [t for t in target_info.values() if t.name not in set(target_unreadable)]
    return TableFacts(
        include=list(include),
        exclude=list(exclude),
        candidates=candidates,
        selected=selected,
        unmatched_include=unmatched_patterns(candidates, include),
        source=source_info,
        target=target_info,
        target_rows=_non_empty(target, sorted(readable_target, key=lambda t: t.name)),
        target_unreadable=target_unreadable,
        source_not_owned=not_owned,
        source_unreadable=source_unreadable,
        sequences=sequences,
        copy_bytes=_copy_bytes(source, source_info.values()),
        partitions=_partitions_below(source, list(source_info.values()), selected),
        source_unreadable_sequences=source_unreadable_sequences,
        target_missing_sequences=target_missing_sequences,
        target_unwritable_sequences=target_unwritable_sequences,
        target_only_constraints=_target_only_constraints(source, target, source_info, target_info),
        source_replica_triggers=_replica_triggers(source, source_info.values()),
        target_replica_triggers=_replica_triggers(target, target_info.values()),
        references_outside=_references_outside(source, target, source_info),
    )


def _references_outside(
    source: Connection, target: Connection, selected: dict[TableName, TableInfo]
) -> list[OutsideReference]:
    """Foreign keys of the selected tables whose referenced table is not migrated, with its state on the target."""
    if not selected:
        return []
    rows = fetch_all(
        source,
        "SELECT DISTINCT n.nspname, c.relname, con.conname, rn.nspname, rc.relname"
        " FROM pg_constraint con"
        " JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_class rc ON rc.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace"
        " WHERE con.contype = 'f' AND con.conrelid = ANY(%s::oid[]) ORDER BY 1, 2, 3",
        ([t.oid for t in selected.values()],),
    )
    selected_oids = {t.oid for t in selected.values()}
    referenced = describe_tables(source, {TableName(r[3], r[4]) for r in rows} - set(selected))
    # A partition is migrated through its selected partitioned ancestor.
    outside = {name for name, info in referenced.items() if not (set(info.ancestor_oids) & selected_oids)}
    if not outside:
        return []
    on_target = describe_tables(target, outside)
    unreadable = _unreadable(on_target.values())
    readable = sorted((t for t in on_target.values() if t.name not in set(unreadable)), key=lambda t: t.name)
    with_rows = _non_empty(target, readable)

    def state(name: TableName) -> str:
        if name not in on_target:
            return "missing"
        if name in set(unreadable):
            return "unreadable"
        return "has rows" if name in with_rows else "empty"

    return [
        OutsideReference(TableName(r[0], r[1]), str(r[2]), TableName(r[3], r[4]), state(TableName(r[3], r[4])))
        for r in rows
        if TableName(r[3], r[4]) in outside
    ]


def _replica_triggers(conn: Connection, tables: Iterable[TableInfo]) -> list[str]:
    """User triggers on `tables` that fire under session_replication_role = replica."""
    by_oid = {t.oid: t.name for t in tables}
    if not by_oid:
        return []
    rows = fetch_all(
        conn,
        "SELECT tgrelid, tgname, tgenabled FROM pg_trigger"
        " WHERE tgrelid = ANY(%s::oid[]) AND NOT tgisinternal AND tgenabled IN ('A', 'R') ORDER BY 1, 2",
        (list(by_oid),),
    )
    how = {"A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}
    return [f"{by_oid[int(oid)]}: trigger {name} ({how[str(enabled)]})" for oid, name, enabled in rows]


@dataclass
class WalSampler:
    """Two readings of the source's WAL position, `seconds` apart; other work may run in between."""

    conn: Connection
    seconds: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _start: Lsn | None = None
    _started_at: float = 0.0

    def start(self) -> None:
        self._start = current_lsn(self.conn)
        self._started_at = self.clock()

    def finish(self) -> WalSample:
        assert self._start is not None, "call start() first"
        remaining = self.seconds - (self.clock() - self._started_at)
        if remaining > 0:
            self.sleep(remaining)
        end = current_lsn(self.conn)
        return WalSample(self._start, end, self.clock() - self._started_at)


def foreign_slots(conn: Connection, slot: str) -> list[str]:
    """Slots named `slot` that belong to another database of this server (or are physical)."""
    rows = fetch_all(
        conn,
        "SELECT slot_type, coalesce(database, '') FROM pg_replication_slots"
        " WHERE slot_name = %s AND database IS DISTINCT FROM current_database()",
        (slot,),
    )
    return [f"{slot} ({kind} slot" + (f" of database {db!r})" if db else ")") for kind, db in rows]


def replication_left(source: Connection, target: Connection, base: str, *, back_only: bool = False) -> list[str]:
    """What of this migration's replication exists in these two databases, named `base` (forward: slot and
    publication on the source, subscription on the target; `base`_dbz: the change stream's slot and
    publication; `base`_rev: the replication back, the other way round; only that one with `back_only`),
    "side: kind name (state)". A fresh migration has none of it; a rolled back one keeps it (its slot holds
    the source's WAL)."""
    forward = [] if back_only else [base, f"{base}_dbz"]
    back = [f"{base}_rev"]
    found: list[str] = []
    for side, conn, publishes, subscribes in (
        ("source", source, forward, back),
        ("target", target, back, forward[:1]),
    ):
        for (name,) in fetch_all(
            conn,
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name = ANY(%s) AND database = current_database()"
            " ORDER BY 1",
            (publishes,),
        ):
            found.append(f"{side}: replication slot {name} (keeps WAL until it is dropped)")
        for (name,) in fetch_all(
            conn, "SELECT pubname FROM pg_publication WHERE pubname = ANY(%s) ORDER BY 1", (publishes,)
        ):
            found.append(f"{side}: publication {name}")
        for name, enabled in fetch_all(
            conn,
            "SELECT subname, subenabled FROM pg_subscription WHERE subname = ANY(%s)"
            " AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1",
            (subscribes,),
        ):
            found.append(f"{side}: subscription {name} ({'enabled' if enabled else 'disabled'})")
    return found


# All the tables' scans together, at most: the Preflight function has 300 s for every read of the checks
VALUE_SCAN_SECONDS = 120.0


@dataclass(frozen=True)
class SentWrongly:
    """Values on the source that Debezium sends wrongly and without an error ("table.column (type): N value(s)"),
    found by `values_sent_wrongly`; and the tables whose scan did not fit the budget."""

    arrays: list[str]  # arrays of more than one dimension, or whose first index is not 1
    bc_dates: list[str]  # dates before 0001-01-01 (its snapshot sends them as the same day AD)
    unscanned: list[TableName]


# (which columns, the condition that finds such a value in column {c})
_ARRAY_SHAPE = "array_ndims({c}) > 1 OR array_lower({c}, 1) <> 1"
_BC_DATE = "isfinite({c}) AND {c} < '0001-01-01'::date"


def values_sent_wrongly(
    conn: Connection,
    tables: Iterable[TableInfo],
    *,
    budget_seconds: float = VALUE_SCAN_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> SentWrongly:
    """Scan each table with array or date columns once for values Debezium sends wrongly without an error
    (`SentWrongly`); each scan stops at what is left of the budget."""
    found: dict[str, list[str]] = {_ARRAY_SHAPE: [], _BC_DATE: []}
    unscanned: list[TableName] = []
    deadline = clock() + budget_seconds
    previous = fetch_value(conn, "SELECT current_setting('statement_timeout')")
    try:
        for table in sorted(tables, key=lambda t: t.name):
            probes = [
                (c, _ARRAY_SHAPE if c.type.endswith("[]") else _BC_DATE)
                for c in table.columns
                if not c.generated and (c.type.endswith("[]") or c.type == "date")
            ]
            if not probes:
                continue
            left_ms = int((deadline - clock()) * 1000)
            if left_ms <= 0:
                unscanned.append(table.name)
                continue
            counts = sql.SQL(", ").join(
                sql.SQL("count(*) FILTER (WHERE {})").format(sql.SQL(condition).format(c=sql.Identifier(c.name)))
                for c, condition in probes
            )
            fetch_value(conn, "SELECT set_config('statement_timeout', %s, false)", (str(left_ms),))
            try:
                row = fetch_one(conn, sql.SQL("SELECT {} FROM {}").format(counts, table.name.ident))
            except psycopg2.errors.QueryCanceled:
                unscanned.append(table.name)
                continue
            assert row is not None
            for (c, condition), n in zip(probes, row, strict=True):
                if n:
                    found[condition].append(f"{table.name}.{c.name} ({c.type}): {n} value(s)")
    finally:
        fetch_value(conn, "SELECT set_config('statement_timeout', %s, false)", (previous,))
    return SentWrongly(found[_ARRAY_SHAPE], found[_BC_DATE], unscanned)
