"""The applier's state on the target, written in the same transaction as the rows it applies.

Because offsets live beside the data, a batch is applied exactly once whatever Kafka redelivers:
a crash before the commit loses both the rows and the offsets, a crash after keeps both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from psycopg2 import sql

from lambdas.core.changestream.events import SNAPSHOT_POSITION, StreamPosition
from lambdas.core.db import Connection, Cursor, fetch_all
from lambdas.core.tables import TableName

SCHEMA = "_zdm"

_DDL = [
    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)),
    sql.SQL(
        """CREATE TABLE IF NOT EXISTS {}.dbz_partitions (
            topic text NOT NULL,
            kafka_partition int NOT NULL,
            next_offset bigint NOT NULL DEFAULT 0,
            commit_lsn bigint NOT NULL DEFAULT 0,
            lsn bigint NOT NULL DEFAULT 0,
            events bigint NOT NULL DEFAULT 0,
            last_source_lsn bigint,
            last_ts_ms bigint,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, kafka_partition))"""
    ).format(sql.Identifier(SCHEMA)),
    # The snapshot whose reads a partition applied last (before this column: its last_source_lsn while
    # it had not streamed yet, see begin_batch).
    sql.SQL("ALTER TABLE {}.dbz_partitions ADD COLUMN IF NOT EXISTS snapshot_lsn bigint").format(
        sql.Identifier(SCHEMA)
    ),
    # Set when another table's newer snapshot emptied this one while it was streaming: its stream
    # events below this LSN predate that snapshot (it holds them) and are skipped until one reaches it.
    sql.SQL("ALTER TABLE {}.dbz_partitions ADD COLUMN IF NOT EXISTS stream_floor bigint").format(
        sql.Identifier(SCHEMA)
    ),
    # The target table a partition's topic feeds (written with its state): any applier can empty it.
    sql.SQL("ALTER TABLE {}.dbz_partitions ADD COLUMN IF NOT EXISTS table_schema text").format(sql.Identifier(SCHEMA)),
    sql.SQL("ALTER TABLE {}.dbz_partitions ADD COLUMN IF NOT EXISTS table_name text").format(sql.Identifier(SCHEMA)),
    sql.SQL(
        """CREATE TABLE IF NOT EXISTS {}.dbz_tables (
            table_name text PRIMARY KEY,
            snapshot_rows bigint NOT NULL DEFAULT 0,
            snapshot_done boolean NOT NULL DEFAULT false,
            events bigint NOT NULL DEFAULT 0)"""
    ).format(sql.Identifier(SCHEMA)),
    # The source's columns of each table (engine start): an event must carry each the target writes.
    sql.SQL("ALTER TABLE {}.dbz_tables ADD COLUMN IF NOT EXISTS source_columns text[]").format(sql.Identifier(SCHEMA)),
    sql.SQL(
        """CREATE TABLE IF NOT EXISTS {}.dbz_dead_letters (
            id bigserial PRIMARY KEY,
            topic text NOT NULL,
            kafka_partition int NOT NULL,
            kafka_offset bigint NOT NULL,
            source_lsn bigint,
            reason text NOT NULL,
            record_key text,
            record_value text,
            created_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (topic, kafka_partition, kafka_offset))"""
    ).format(sql.Identifier(SCHEMA)),
    sql.SQL(
        """CREATE TABLE IF NOT EXISTS {}.dbz_stream (
            id int PRIMARY KEY CHECK (id = 1),
            snapshot_completed boolean NOT NULL DEFAULT false)"""
    ).format(sql.Identifier(SCHEMA)),
    sql.SQL("INSERT INTO {}.dbz_stream (id) VALUES (1) ON CONFLICT DO NOTHING").format(sql.Identifier(SCHEMA)),
    # The newest snapshot whose reads were applied (each snapshot's reads carry its LSN): reads of an
    # older one are stale, and a table holding an older one's rows is emptied (`reset_stale_snapshots`).
    sql.SQL("ALTER TABLE {}.dbz_stream ADD COLUMN IF NOT EXISTS snapshot_lsn bigint").format(sql.Identifier(SCHEMA)),
    # A row of its own: every batch holds it FOR SHARE, and only a pause or a resume updates it, so
    # appliers running side by side never wait on (or deadlock over) each other's progress updates.
    sql.SQL(
        """CREATE TABLE IF NOT EXISTS {}.dbz_control (
            id int PRIMARY KEY CHECK (id = 1),
            applier_paused boolean NOT NULL DEFAULT false,
            offsets_seeded boolean NOT NULL DEFAULT false)"""
    ).format(sql.Identifier(SCHEMA)),
    # offsets_seeded is set in the transaction that seeds the offsets (engine start): until then a start is a
    # first start. A table an earlier version made gets it true (its start had seeded), then default false.
    sql.SQL(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {t}::regclass"
        " AND attname = 'offsets_seeded' AND NOT attisdropped) THEN"
        " ALTER TABLE {i} ADD COLUMN offsets_seeded boolean NOT NULL DEFAULT true;"
        " ALTER TABLE {i} ALTER COLUMN offsets_seeded SET DEFAULT false; END IF; END $$"
    ).format(t=sql.Literal(f"{SCHEMA}.dbz_control"), i=sql.Identifier(SCHEMA, "dbz_control")),
    sql.SQL("INSERT INTO {}.dbz_control (id) VALUES (1) ON CONFLICT DO NOTHING").format(sql.Identifier(SCHEMA)),
]

STATE_TABLES = ("dbz_partitions", "dbz_tables", "dbz_dead_letters", "dbz_stream", "dbz_control")


def ensure_state_tables(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(hashtext('zdm.dbz_state'))")  # concurrent creators
        try:
            for statement in _DDL:
                cur.execute(statement)
            if not conn.autocommit:
                conn.commit()
        finally:
            cur.execute("SELECT pg_advisory_unlock(hashtext('zdm.dbz_state'))")
            if not conn.autocommit:
                conn.commit()


def record_source_columns(conn: Connection, columns: Mapping[str, Sequence[str]]) -> None:
    """Keep each table's source columns (by its name, schema.table) for the appliers to check events against."""
    pairs = [(name, column, i) for name, names in sorted(columns.items()) for i, column in enumerate(names)]
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO {}.dbz_tables AS t (table_name, source_columns)"
                " SELECT n, array_agg(c ORDER BY o) FROM unnest(%s::text[], %s::text[], %s::int[]) AS u(n, c, o)"
                " GROUP BY n ON CONFLICT (table_name) DO UPDATE SET source_columns = EXCLUDED.source_columns"
            ).format(sql.Identifier(SCHEMA)),
            ([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]),
        )
    if not conn.autocommit:
        conn.commit()


def source_columns(conn: Connection) -> dict[str, frozenset[str]]:
    """Each table's source columns as recorded at the engine's start (none recorded: not in the result)."""
    if fetch_all(conn, "SELECT to_regclass(%s)", (f"{SCHEMA}.dbz_tables",))[0][0] is None:
        return {}
    rows = fetch_all(
        conn,
        sql.SQL("SELECT table_name, source_columns FROM {}.dbz_tables WHERE source_columns IS NOT NULL").format(
            sql.Identifier(SCHEMA)
        ),
    )
    return {name: frozenset(columns) for name, columns in rows}


KEPT_ROWS_PREFIX = "dbz_moved_"  # the applier's tables keeping a deleted row for a key move (statements._stash_names)


def kept_row_tables(conn: Connection) -> list[str]:
    """The applier's tables of kept rows (copies of deleted rows: dropped with the rest of the state)."""
    rows = fetch_all(
        conn,
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND starts_with(tablename, %s) ORDER BY 1",
        (SCHEMA, KEPT_ROWS_PREFIX),
    )
    return [name for (name,) in rows]


def drop_state_tables(conn: Connection, keep: Iterable[str] = ()) -> list[str]:
    """Drop the stream's state tables and kept-row tables, but those named in `keep`; the names dropped."""
    names = [name for name in [*STATE_TABLES, *kept_row_tables(conn)] if name not in set(keep)]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))
    if not conn.autocommit:
        conn.commit()
    return [f"{SCHEMA}.{name}" for name in names]


@dataclass
class PartitionState:
    topic: str
    partition: int
    next_offset: int = 0
    position: StreamPosition = SNAPSHOT_POSITION
    events: int = 0
    last_source_lsn: int | None = None
    last_ts_ms: int | None = None
    snapshot_lsn: int | None = None  # the snapshot whose reads were applied here last (each read carries it)
    stream_floor: int | None = None  # stream events below this LSN are skipped (see the column)

    @property
    def streaming(self) -> bool:
        """A streamed change was applied here since its snapshot: reads of that snapshot are replays."""
        return self.position != SNAPSHOT_POSITION


@dataclass
class BatchStart:
    paused: bool
    partitions: dict[tuple[str, int], PartitionState]
    snapshot_lsn: int | None  # the newest snapshot applied so far (dbz_stream.snapshot_lsn)


def begin_batch(cur: Cursor, keys: Iterable[tuple[str, int]]) -> BatchStart:
    """A batch's first round trip: replica mode for the transaction, the pause flag (held FOR SHARE:
    a pause waits for this batch), the newest snapshot applied, and each partition's state, locked
    for this transaction (two appliers never interleave on one)."""
    keys = sorted(set(keys))
    topics, partitions = [k[0] for k in keys], [k[1] for k in keys]
    cur.execute(
        sql.SQL(
            "SET LOCAL session_replication_role = replica;"
            " INSERT INTO {schema}.dbz_partitions (topic, kafka_partition)"
            " SELECT * FROM unnest(%(topics)s::text[], %(partitions)s::int[]) ON CONFLICT DO NOTHING;"
            " WITH control AS (SELECT applier_paused FROM {schema}.dbz_control WHERE id = 1 FOR SHARE),"
            " parts AS (SELECT p.topic, p.kafka_partition, p.next_offset, p.commit_lsn, p.lsn, p.events,"
            "  p.last_source_lsn, p.last_ts_ms,"
            "  coalesce(p.snapshot_lsn, CASE WHEN p.commit_lsn = 0 AND p.lsn = 0 THEN p.last_source_lsn END),"
            "  p.stream_floor FROM {schema}.dbz_partitions p"
            "  JOIN unnest(%(topics)s::text[], %(partitions)s::int[]) AS w(t, n)"
            "  ON p.topic = w.t AND p.kafka_partition = w.n ORDER BY 1, 2 FOR UPDATE OF p)"
            " SELECT coalesce((SELECT applier_paused FROM control), false),"
            "  (SELECT snapshot_lsn FROM {schema}.dbz_stream WHERE id = 1), parts.* FROM (SELECT 1) AS one"
            " LEFT JOIN parts ON true"
        ).format(schema=sql.Identifier(SCHEMA)),
        {"topics": topics, "partitions": partitions},
    )
    rows = cur.fetchall()
    states = {
        (t, n): PartitionState(t, n, off, StreamPosition(c, lsn), ev, last_lsn, ts, snap, floor)
        for _, _, t, n, off, c, lsn, ev, last_lsn, ts, snap, floor in rows
        if t is not None
    }
    return BatchStart(bool(rows[0][0]), states, rows[0][1])


def reset_stale_snapshots(cur: Cursor, snapshot_lsn: int, batch: Iterable[tuple[str, int]]) -> list[TableName]:
    """Record `snapshot_lsn` as the newest snapshot. When it replaces an older one (the connector took it
    again), the stream is copying again (snapshot progress reset), and the tables fed by partitions
    outside `batch` that hold an older snapshot's rows (and changes streamed after it) are returned:
    they must be emptied (in this transaction), since a table that was empty at the newer snapshot
    gets no read at all. Those partitions are moved to the newer snapshot, their stream position reset
    and their stream events older than it skipped from now on (rows locked in key order)."""
    schema = sql.Identifier(SCHEMA)
    cur.execute(sql.SQL("SELECT snapshot_lsn FROM {}.dbz_stream WHERE id = 1 FOR UPDATE").format(schema))
    row = cur.fetchone()
    previous = row[0] if row else None
    if previous is not None and previous >= snapshot_lsn:
        return []  # another applier recorded it (or a newer one) meanwhile
    cur.execute(sql.SQL("UPDATE {}.dbz_stream SET snapshot_lsn = %s WHERE id = 1").format(schema), (snapshot_lsn,))
    if previous is None:
        return []  # the first snapshot
    in_batch = set(batch)
    cur.execute(
        sql.SQL(
            "UPDATE {s}.dbz_stream SET snapshot_completed = false WHERE id = 1;"
            " UPDATE {s}.dbz_tables SET snapshot_done = false, snapshot_rows = 0;"
            " SELECT topic, kafka_partition, table_schema, table_name FROM {s}.dbz_partitions"
            " WHERE table_name IS NOT NULL AND coalesce(snapshot_lsn, last_source_lsn) < %(lsn)s"
            " ORDER BY 1, 2 FOR UPDATE"
        ).format(s=schema),
        {"lsn": snapshot_lsn},
    )
    rows = [r for r in cur.fetchall() if (r[0], r[1]) not in in_batch]
    if rows:
        cur.execute(
            sql.SQL(
                "UPDATE {s}.dbz_partitions AS p SET snapshot_lsn = %(lsn)s, commit_lsn = 0, lsn = 0,"
                " stream_floor = CASE WHEN p.commit_lsn = 0 AND p.lsn = 0 THEN p.stream_floor ELSE %(lsn)s END,"
                " updated_at = now()"
                " FROM unnest(%(topics)s::text[], %(partitions)s::int[]) AS v(topic, kafka_partition)"
                " WHERE p.topic = v.topic AND p.kafka_partition = v.kafka_partition"
            ).format(s=schema),
            {"lsn": snapshot_lsn, "topics": [r[0] for r in rows], "partitions": [r[1] for r in rows]},
        )
    return sorted({TableName(r[2], r[3]) for r in rows}, key=str)


def seed_offsets(conn: Connection, offsets: Mapping[tuple[str, int], int]) -> None:
    """Start these partitions at `offsets` unless the applier already keeps a position for them.

    A first start seeds each topic's current end: records an earlier run of the same migration left
    on the topics (a start again after a teardown) are never applied to this run's target.
    """
    with conn.cursor() as cur:
        for (topic, partition), offset in sorted(offsets.items()):
            cur.execute(
                sql.SQL(
                    "INSERT INTO {}.dbz_partitions (topic, kafka_partition, next_offset) VALUES (%s, %s, %s)"
                    " ON CONFLICT DO NOTHING"
                ).format(sql.Identifier(SCHEMA)),
                (topic, partition, offset),
            )
    if not conn.autocommit:
        conn.commit()


def offsets_seeded(conn: Connection) -> bool:
    """Whether a start has seeded the offsets (and so decided this run's starting points) on this target."""
    if fetch_all(conn, "SELECT to_regclass(%s)", (f"{SCHEMA}.dbz_control",))[0][0] is None:
        return False
    rows = fetch_all(
        conn,
        sql.SQL("SELECT offsets_seeded FROM {}.dbz_control WHERE id = 1").format(sql.Identifier(SCHEMA)),
    )
    return bool(rows and rows[0][0])


def seed_offsets_once(conn: Connection, offsets: Mapping[tuple[str, int], int]) -> None:
    """A first start's `seed_offsets` and the mark that they were seeded, in one transaction (`conn` in
    autocommit mode). What an earlier run left (a teardown that died midway) is reset first: its positions
    and its snapshot progress are not this run's."""
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        try:
            cur.execute(
                sql.SQL(
                    "DELETE FROM {s}.dbz_partitions; DELETE FROM {s}.dbz_tables;"
                    " UPDATE {s}.dbz_stream SET snapshot_completed = false"
                ).format(s=sql.Identifier(SCHEMA))
            )
            seed_offsets(conn, offsets)
            cur.execute(
                sql.SQL("UPDATE {}.dbz_control SET offsets_seeded = true WHERE id = 1").format(sql.Identifier(SCHEMA))
            )
            cur.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                cur.execute("ROLLBACK")
            raise


def stored_offsets(conn: Connection, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The next offset to read per partition, as the target last committed it."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT topic, kafka_partition, next_offset FROM {}.dbz_partitions WHERE topic = ANY(%s)").format(
                sql.Identifier(SCHEMA)
            ),
            (list(topics),),
        )
        rows = cur.fetchall()
    if not conn.autocommit:
        conn.rollback()
    return {(t, n): off for t, n, off in rows}


def set_applier_paused(conn: Connection, paused: bool, lock_timeout: str = "10s") -> None:
    """Pause or resume applying, on the target itself, whatever runs the applier.

    Every batch reads the flag FOR SHARE in its own transaction: setting it waits for the batch in
    flight to commit, and no batch applies anything after it. The cutover pauses the applier this way
    before it starts the back replication (no forward change may land after the back slot exists).
    """
    with conn.cursor() as cur:
        if conn.autocommit:
            cur.execute("BEGIN")
        cur.execute("SET LOCAL lock_timeout = %s", (lock_timeout,))
        cur.execute(
            sql.SQL(
                "INSERT INTO {}.dbz_control (id, applier_paused) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET applier_paused = EXCLUDED.applier_paused"
            ).format(sql.Identifier(SCHEMA)),
            (paused,),
        )
        if conn.autocommit:
            cur.execute("COMMIT")
    if not conn.autocommit:
        conn.commit()
