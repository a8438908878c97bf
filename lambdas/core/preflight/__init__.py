"""Preflight: everything that would stop or endanger a migration, checked before anything is created.

`run_preflight` reads facts from both servers (facts.py, the only SQL) and evaluates them with pure
checks (checks.py); `format_report` renders the result for a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from lambdas.core.config import COPY_TIME_BUDGET_SECONDS, Migration
from lambdas.core.db import Connection, DatabaseUnreachable, connect, fetch_one, fetch_value
from lambdas.core.preflight.checks import CHECKS, evaluate, server_version_result
from lambdas.core.preflight.facts import (
    DiskProbe,
    LocalDiskProbe,
    PreflightFacts,
    WalSampler,
    foreign_slots,
    gather_server,
    gather_tables,
    replication_left,
    server_version,
    values_sent_wrongly,
)
from lambdas.core.preflight.model import CheckResult, PreflightReport, Status
from lambdas.core.preflight.report import format_report

__all__ = [
    "CHECKS",
    "CheckResult",
    "DiskProbe",
    "LocalDiskProbe",
    "PreflightFacts",
    "PreflightReport",
    "Status",
    "evaluate",
    "format_report",
    "gather_facts",
    "run_preflight",
]


_DATABASE_IDENTITY = (
    "SELECT pg_postmaster_start_time()::text, current_database(),"
    " (SELECT oid FROM pg_database WHERE datname = current_database())::text"
)


def same_database_result(source_conn: Connection, target_conn: Connection) -> CheckResult | None:
    """A failed check when the target connection reaches the source database itself (same server
    start time, database and oid), else None."""
    identities = [fetch_one(conn, _DATABASE_IDENTITY) for conn in (source_conn, target_conn)]
    if identities[0] is None or identities[0] != identities[1]:
        return None
    return CheckResult(
        "distinct_databases",
        "fail",
        f"source and target reach the same database ({identities[0][1]!r} on one server)",
        "Point 'target' in the migration file at the new database: a migration of a database onto itself "
        "would replicate it into itself and fence it.",
    )


def gather_facts(
    source_conn: Connection,
    target_conn: Connection,
    migration: Migration,
    *,
    disk_probe: DiskProbe | None = None,
    wal_rate_sample_seconds: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> PreflightFacts:
    """Read everything the checks need. The WAL sample runs across the other reads, so it adds
    at most `wal_rate_sample_seconds` to the run, often less."""
    sampler = WalSampler(source_conn, wal_rate_sample_seconds, clock, sleep)
    sampler.start()
    source = gather_server(source_conn)
    target = gather_server(target_conn)
    tables = gather_tables(source_conn, target_conn, list(migration.tables.include), list(migration.tables.exclude))
    if migration.engine.type == "debezium":  # arrays and dates its connector sends wrongly (no error to see)
        tables = replace(tables, sent_wrongly=values_sent_wrongly(source_conn, tables.source.values()))
    free_disk = disk_probe.free_bytes(source_conn) if disk_probe is not None else None
    wal = sampler.finish()
    # The forward slot is created on the source, the back one on the target (at cutover); the engine drops a
    # slot of that name first, whichever database it belongs to.
    slots = [f"source: {s}" for s in foreign_slots(source_conn, migration.slot_name)]
    slots += [f"target: {s}" for s in foreign_slots(target_conn, migration.slot_name + "_rev")]
    return PreflightFacts(
        source=source,
        target=target,
        tables=tables,
        wal=wal,
        free_disk_bytes=free_disk,
        engine=migration.engine.type,
        copy_method=migration.engine.logical.copy_method,
        expected_copy_mb_per_s=migration.engine.logical.expected_copy_mb_per_s,
        own_subscriptions=(migration.slot_name, migration.slot_name + "_rev"),
        foreign_slots=tuple(slots),
        replication_left=tuple(replication_left(source_conn, target_conn, migration.slot_name)),
        # AWS endpoints (secrets): the copy runs inside the Replication function; locally nothing limits it
        copy_time_limit_seconds=COPY_TIME_BUDGET_SECONDS if migration.source.secret_arn else None,
        copy_workers=migration.engine.logical.copy_workers,
        validation_sessions=migration.validation.max_parallel_chunks if migration.validation.enabled else 0,
    )


def standby_result(source_conn: Connection, target_conn: Connection) -> CheckResult | None:
    """A failed check when either side is a standby (in recovery), else None. A read replica's endpoint in the
    file is an easy mistake; the other checks could not even read the source's WAL position there."""
    standbys = [
        side
        for side, conn in (("source", source_conn), ("target", target_conn))
        if fetch_value(conn, "SELECT pg_is_in_recovery()")
    ]
    if not standbys:
        return None
    return CheckResult(
        "primary_servers",
        "fail",
        f"{' and '.join(standbys)}: a standby server (pg_is_in_recovery() is true), read-only",
        "Point "
        + " and ".join(f"'{side}'" for side in standbys)
        + " in the migration file at the primary: on RDS the instance itself, on Aurora the cluster's writer "
        "endpoint, not a read replica or the reader endpoint. The source holds the migration's publication, slot "
        "and write fence; the target receives the copy and every change; a standby can do neither.",
        [f"{side}: in recovery (a standby)" for side in standbys],
    )


def proxy_login_result(login_dsn: str) -> CheckResult:
    """The rds-proxy router retargets the application's proxy from the source to the target at cutover;
    the proxy logs in to whichever database it fronts with its secret, the source's. `login_dsn`: the
    target, logged in to as the source's user (`endpoints.with_login_of`)."""
    name = "proxy_login_on_target"
    try:
        conn = connect(login_dsn, application_name="zdm-preflight")
    except DatabaseUnreachable as exc:
        return CheckResult(
            name,
            "fail",
            "the source's user and password do not log in to the target",
            "At cutover the application's RDS Proxy is pointed at the target and keeps logging in with the "
            "source's secret: the target would never become available behind it and the cutover would roll back. "
            "Create that user on the target with the same password (or give the proxy a secret that works on both).",
            [str(exc)],
        )
    conn.close()
    return CheckResult(name, "pass", "the source's user and password log in to the target (the proxy's secret)")


def run_preflight(
    source_conn: Connection,
    target_conn: Connection,
    migration: Migration,
    *,
    disk_probe: DiskProbe | None = None,
    wal_rate_sample_seconds: float = 1.0,
    proxy_login_dsn: str | None = None,
) -> PreflightReport:
    """Check that `migration` can run between these two servers; read-only on both.

    Pass connections as `lambdas.core.db.connect` opens them (autocommit). With a connection not
    in autocommit, the transaction the preflight opened is rolled back at the end. A server older
    than PostgreSQL 10 gets only the version check (the others need catalog views it lacks).
    """
    idle = [
        conn
        for conn in (source_conn, target_conn)
        if not conn.autocommit and conn.info.transaction_status == TRANSACTION_STATUS_IDLE
    ]
    try:
        versions = server_version(source_conn), server_version(target_conn)
        version_check = server_version_result(*versions)
        if version_check.status == "fail":
            return PreflightReport([version_check])
        same = same_database_result(source_conn, target_conn)
        if same is not None:
            return PreflightReport([version_check, same])
        standby = standby_result(source_conn, target_conn)
        if standby is not None:
            return PreflightReport([version_check, standby])
        facts = gather_facts(
            source_conn,
            target_conn,
            migration,
            disk_probe=disk_probe,
            wal_rate_sample_seconds=wal_rate_sample_seconds,
        )
        report = evaluate(facts)
        if proxy_login_dsn is not None:
            report.checks.append(proxy_login_result(proxy_login_dsn))
        return report
    finally:
        for conn in idle:
            conn.rollback()
