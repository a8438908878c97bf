"""A replicating shop behind a real pgbouncer, for the cutover and router tests.

`shop` gives: the sample schema on both servers, forward logical replication streaming,
pgbouncer serving the writer alias `app` (and the reader alias `app_ro`) from the source,
the pgbouncer router, and a cutover runner. Helpers take repeatable-read snapshots of both
sides (to compare them row for row at one instant) and read the workload's numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from lambdas.core.config import Cutover, LogicalSettings
from lambdas.core.cutover import CutoverPlan, CutoverRunner, Hooks, OperationResult, Step
from lambdas.core.cutover.steps import CUTOVER_STEPS
from lambdas.core.db import Connection, connect, execute, fetch_value
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.lsn import Lsn, wait_for_lsn
from lambdas.core.routers.pgbouncer import PgbouncerBackend, PgbouncerRouter
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.compare import TableDiff, compare_databases
from rehearsal.pgbouncer import LocalBackend, PgbouncerProcess, start_pgbouncer
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload, WorkloadStats

TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)
FORWARD = ReplicationNames("zdm_shop")
REVERSE = ReplicationNames("zdm_shop_rev")


@dataclass
class Shop:
    source: PostgresServer
    target: PostgresServer
    dbname: str
    pgbouncer: PgbouncerProcess
    router: PgbouncerRouter
    settings: Cutover = field(default_factory=Cutover)

    @property
    def src(self) -> str:
        return self.source.dsn(self.dbname)

    @property
    def tgt(self) -> str:
        return self.target.dsn(self.dbname)

    @property
    def app(self) -> str:
        """What the application connects to: pgbouncer's writer alias."""
        return self.pgbouncer.dsn("app")

    def plan(self, logical: LogicalSettings | None = None, **changes: Any) -> CutoverPlan:
        settings = self.settings.model_copy(update=changes) if changes else self.settings
        logical = logical or LogicalSettings(copy_workers=2, copy_chunk_rows=5000)
        return CutoverPlan("shop", TABLES, FORWARD, REVERSE, settings, logical, 64 << 20)

    def runner(
        self, hooks: Hooks | None = None, logical: LogicalSettings | None = None, **changes: Any
    ) -> CutoverRunner:
        return CutoverRunner(self.src, self.tgt, self.router, self.plan(logical, **changes), hooks=hooks)

    def forward_engine(self) -> LogicalEngine:
        plan = LogicalReplicationPlan(FORWARD, TABLES, LogicalSettings(copy_workers=2, copy_chunk_rows=5000))
        return LogicalEngine(self.src, self.tgt, plan)

    def wait_caught_up(self, *, reverse: bool = False, timeout: float = 30) -> None:
        """The subscriber side has applied everything the publisher side has written so far."""
        publisher, subscriber, names = (self.tgt, self.src, REVERSE) if reverse else (self.src, self.tgt, FORWARD)
        pub, sub = connect(publisher), connect(subscriber)
        try:
            # The insert position: with asynchronous commit the write position may lag behind commits.
            written = Lsn.parse(fetch_value(pub, "SELECT pg_current_wal_insert_lsn()::text"))
            # Then WAL past it, flushed at once, so the walsender decodes past it and tells the
            # subscriber (an empty transaction as far as the publication goes).
            execute(pub, "SET synchronous_commit = on")
            execute(pub, "SELECT pg_logical_emit_message(true, 'zdm-test', 'sync')")
            wait_for_lsn(sub, names.subscription, written, timeout=timeout, source=pub, slot=names.slot)
        finally:
            pub.close()
            sub.close()

    def diffs(self) -> list[TableDiff]:
        return compare_databases(self.src, self.tgt, list(TABLES))


def quick_worker_starts(server: PostgresServer) -> None:
    """PostgreSQL's launcher starts apply workers at most once per wal_retrieve_retry_interval
    (5 s) per server; tests create a subscription every few seconds, so they lower it."""
    conn = connect(server.dsn("postgres"))
    try:
        if fetch_value(conn, "SELECT setting FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'") != "200":
            execute(conn, "ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
            execute(conn, "SELECT pg_reload_conf()")
    finally:
        conn.close()


def pgbouncer_router(
    source: PostgresServer, target: PostgresServer, dbname: str
) -> tuple[PgbouncerProcess, PgbouncerRouter]:
    """A real pgbouncer serving the writer alias `app` and the reader alias `app_ro` from the source, and
    the router that moves them."""
    pgb = start_pgbouncer({"app": LocalBackend(source, dbname), "app_ro": LocalBackend(source, dbname)})
    router = PgbouncerRouter(
        pgb.admin_dsn(),
        pgb.config_path,
        writer_alias="app",
        reader_alias="app_ro",
        source=PgbouncerBackend.parse(pgb.backend(source, dbname)),
        target=PgbouncerBackend.parse(pgb.backend(target, dbname)),
    )
    return pgb, router


def start_shop(
    source: PostgresServer,
    target: PostgresServer,
    dbname: str,
    rows: int = 5_000,
    *,
    forward: bool = True,
    kind: type[Shop] = Shop,
) -> Shop:
    """The shop; `forward=False` leaves starting replication to the test (another engine); `kind`: a Shop
    subclass (other DSNs, say)."""
    for server in (source, target):
        quick_worker_starts(server)
    src_conn, tgt_conn = connect(source.dsn(dbname)), connect(target.dsn(dbname))
    try:
        sample.create_schema(src_conn)
        sample.create_schema(tgt_conn)
        sample.load_data(src_conn, rows)
    finally:
        src_conn.close()
        tgt_conn.close()
    pgb, router = pgbouncer_router(source, target, dbname)
    shop = kind(source, target, dbname, pgb, router)
    if not forward:
        return shop
    try:
        shop.forward_engine().start()
        shop.wait_caught_up()
    except BaseException:
        clean_up(shop)
        raise
    return shop


def clean_up(shop: Shop) -> None:
    """Leave both databases droppable: no fence, no subscription, no slot (in either direction)."""
    shop.pgbouncer.stop()
    for server in (shop.source, shop.target):
        admin = connect(server.dsn("postgres"))
        try:
            execute(
                admin,
                sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(sql.Identifier(shop.dbname)),
            )
        finally:
            admin.close()
    for server in (shop.source, shop.target):
        conn = connect(server.dsn(shop.dbname))
        try:
            subs = [
                r[0]
                for r in _rows(
                    conn,
                    "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
            ]
            for name in subs:
                ident = sql.Identifier(name)
                execute(conn, sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
                execute(conn, sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
                execute(conn, sql.SQL("DROP SUBSCRIPTION {}").format(ident))
        finally:
            conn.close()
    for server in (shop.source, shop.target):
        conn = connect(server.dsn(shop.dbname))
        try:
            deadline = time.monotonic() + 10
            while True:
                slots = _rows(
                    conn,
                    "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = current_database()",
                )
                if not slots:
                    break
                for name, pid in slots:
                    if pid is not None:
                        execute(conn, "SELECT pg_terminate_backend(%s)", (pid,))
                    else:
                        with contextlib.suppress(psycopg2.Error):
                            execute(conn, "SELECT pg_drop_replication_slot(%s)", (name,))
                if time.monotonic() > deadline:
                    raise AssertionError(f"slots stay in use: {slots}")
                time.sleep(0.05)
        finally:
            conn.close()


def _rows(conn: Connection, query: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query)
        return list(cur.fetchall())


def assert_no_difference(diffs: list[TableDiff]) -> int:
    """Every table equal row for row; returns the rows compared."""
    for diff in diffs:
        assert diff.equal, (
            f"{diff.table}: {len(diff.missing_on_target)} missing on the target, {len(diff.extra_on_target)} extra, "
            f"{len(diff.changed)} changed, e.g. {(diff.missing_on_target + diff.extra_on_target + diff.changed)[:5]}"
        )
    return sum(d.source_rows for d in diffs)


def longest_gap(stats: WorkloadStats) -> float:
    """The longest time no transaction finished: what clients experienced as a write pause."""
    ends = sorted(start + seconds for start, seconds in stats.latencies)
    return max((b - a for a, b in itertools.pairwise(ends)), default=0.0)


def percentile(stats: WorkloadStats, q: float) -> float:
    values = sorted(seconds for _, seconds in stats.latencies)
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def server_port(dsn: str) -> int:
    conn = connect(dsn)
    try:
        return int(fetch_value(conn, "SELECT current_setting('port')"))
    finally:
        conn.close()


def read_only_error(
    dsn: str, statement: str = "INSERT INTO customers (email, name) VALUES ('x@example.com', 'x')"
) -> str | None:
    """The error a new session gets for a write, or None if the write succeeded (then rolled back)."""
    conn = connect(dsn, autocommit=False)
    try:
        execute(conn, statement)
        conn.rollback()
        return None
    except psycopg2.Error as exc:
        return type(exc).__name__
    finally:
        conn.close()


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def shop_in(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    source, target = pg_pair
    dbname = psycopg2.extensions.parse_dsn(fresh_dbs[0])["dbname"]
    shop = start_shop(source, target, dbname)
    try:
        yield shop
    finally:
        clean_up(shop)


def cutover_under_writes(shop: Shop, runner: CutoverRunner) -> tuple[OperationResult, WorkloadStats]:
    """8 clients write through pgbouncer, the cutover runs half way; then every step ran, no transaction
    failed, and the catch-up waited for a change stream's fence marker (engines debezium and dms)."""
    workload = Workload(shop.app, clients=8, rate=40.0).start()
    time.sleep(2.0)
    result = runner.cutover()
    time.sleep(1.0)
    stats = workload.stop()
    assert stats.failed == 0, stats.errors
    assert result.status == "done", result
    assert [s.step for s in result.steps] == [s.value for s in CUTOVER_STEPS]
    catch_up = next(s for s in result.steps if s.step == Step.CATCH_UP.value)
    assert catch_up.detail["signal"] == "fence marker"
    return result, stats
