"""Planning against the two databases: catalog facts, the row hash both servers agree on, key boundaries."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from lambdas.core.catalog import TableInfo, describe_tables
from lambdas.core.config import Validation
from lambdas.core.db import Connection, fetch_all, fetch_one, fetch_value, server_version_num
from lambdas.core.ranges import chunk_count, estimate_rows, key_boundaries
from lambdas.core.tables import TableName
from lambdas.core.validation.model import Replication, RowHash, ValidationPlan
from lambdas.core.validation.plan import (
    bucket_scan_shape,
    chunk_specs,
    effective_slice_rows,
    table_spec,
    tables_to_compare,
)
from lambdas.core.validation.session import SessionPair

SAMPLES_PER_SLICE = 50  # block-sample keys per planned slice (slice sizes need not be exact)
MAX_SAMPLES = 200_000  # beyond this, slices grow; a slice found too big is bisected when it mismatches

# Texts both servers hash at plan time: ASCII, non-ASCII, long, with control characters.
PROBE_TEXTS = ["", "zdm", "Zoë Ångström – 李小龍 ✓", "tab\there\nnew line \\ backslash", "x" * 5000]
# Values hashed by type at plan time (`model.ValueHash`): each must hash the same on both servers.
PROBE_VALUES = (
    "SELECT hashint8extended(-9223372036854775808, 1), hashint8extended(123456789012345, 2),"
    " hashint8extended(7::smallint::bigint, 3), timestamp_hash_extended(timestamp '2024-02-29 12:34:56.789012', 4),"
    " timestamp_hash_extended(timestamptz '2024-02-29 12:34:56.789012+00'::timestamp, 5),"
    " uuid_hash_extended('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, 6)"
)


def choose_row_hash(source: Connection, target: Connection, mode: str = "auto") -> RowHash:
    """The fast hash when both servers give the same hashes for the same text; md5 otherwise.

    hashtextextended hashes the server encoding's bytes and its result may depend on the
    platform, so it is used only when the encodings match and the probe texts hash the same.
    """
    if mode == "md5":
        return RowHash.MD5
    if min(server_version_num(source), server_version_num(target)) < 110000:
        return RowHash.MD5
    encodings = {fetch_value(conn, "SHOW server_encoding") for conn in (source, target)}
    if len(encodings) != 1:
        return RowHash.MD5
    query = 'SELECT hashtextextended(x COLLATE "C", 0) FROM unnest(%s::text[]) WITH ORDINALITY AS u(x, n) ORDER BY n'
    hashes = [fetch_all(conn, query, (PROBE_TEXTS,)) for conn in (source, target)]
    values = [fetch_all(conn, PROBE_VALUES) for conn in (source, target)]
    return RowHash.FAST if hashes[0] == hashes[1] and values[0] == values[1] else RowHash.MD5


# How a key column's collation orders text, version-independently (to_jsonb: PostgreSQL 15 calls the ICU
# locale daticulocale/colliculocale, 17 datlocale/colllocale).
_COLLATION_FIELDS = ("provider", "collate", "ctype", "iculocale", "locale", "icurules", "isdeterministic")
KEY_COLLATIONS = (
    "SELECT a.attname, to_jsonb(c), (SELECT to_jsonb(d) FROM pg_database d WHERE d.datname = current_database())"
    " FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation"
    " WHERE a.attrelid = %s AND a.attname = ANY(%s) AND a.attcollation <> 0"
)


def key_collations(conn: Connection, table: TableInfo) -> dict[str, dict[str, object]]:
    """Each collatable key column's collation, as what decides its order (the database's for "default")."""
    out: dict[str, dict[str, object]] = {}
    for column, collation, database in fetch_all(conn, KEY_COLLATIONS, (table.oid, list(table.primary_key))):
        if collation.get("collname") == "default":
            out[column] = {f: database.get("dat" + ("loc" + f if f == "provider" else f)) for f in _COLLATION_FIELDS}
            out[column]["isdeterministic"] = True  # a database's default collation always is
        else:
            out[column] = {f: collation.get("coll" + f) for f in _COLLATION_FIELDS}
    return out


KEY_CORRELATION = (
    "SELECT correlation FROM pg_stats WHERE schemaname = %s AND tablename = %s AND attname = %s"
    " ORDER BY inherited LIMIT 1"
)


def key_correlation(conn: Connection, table: TableName, column: str) -> float | None:
    """How closely the column's order follows the rows' physical order (pg_stats, from ANALYZE; None without)."""
    row = fetch_one(conn, KEY_CORRELATION, (table.schema, table.name, column))
    return None if row is None or row[0] is None else float(row[0])


def replication_of(
    target: Connection, subscription: str, *, slot: str | None, settings: Validation
) -> Replication | None:
    """Re-check settings when `subscription` exists and is enabled on the target; None otherwise."""
    row = fetch_one(
        target,
        "SELECT s.subenabled FROM pg_subscription s WHERE s.subname = %s"
        " AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (subscription,),
    )
    if row is None or not row[0]:
        return None
    return Replication(
        subscription=subscription,
        slot=slot,
        timeout_seconds=settings.recheck_timeout_seconds,
        attempts=settings.recheck_attempts,
    )


def plan_validation(
    pair: SessionPair,
    tables: Sequence[TableName],
    settings: Validation,
    *,
    replication: Replication | None = None,
    clock: Callable[[], float] = time.time,
) -> ValidationPlan:
    """Every selected table's spec and chunks. Reads the catalog on both sides and samples keys on the source."""
    started = clock()
    source, target = pair.source, pair.target
    source_infos = describe_tables(source, tables)
    target_infos = describe_tables(target, tables)
    row_hash = choose_row_hash(source, target, settings.row_hash)
    specs = []
    chunks = []
    slice_rows = effective_slice_rows(settings)
    for name in tables_to_compare(tables, source_infos):
        src, tgt = source_infos.get(name), target_infos.get(name)
        # Not sampled when the role may not read every row (refused): table_spec reports the table.
        estimated = (
            estimate_rows(source, src) if src is not None and src.readable and not src.row_security_active else 0
        )
        spec = table_spec(name, src, tgt, row_hash, estimated)
        if (
            src is not None
            and tgt is not None
            and spec.comparable
            and not spec.multiset
            and key_collations(source, src) != key_collations(target, tgt)
        ):
            # Key ranges would select different rows on the two sides (and bisection never
            # converge): compare the rows as a multiset instead, which needs no key order.
            note = (
                f"compared as a multiset (rows named by their text, one chunk): the key ({', '.join(spec.key)}) "
                "sorts under another collation on the target, so key ranges would select different rows"
            )
            spec = spec.model_copy(update={"key": [], "key_types": [], "notes": [*spec.notes, note]})
        bucket_scan = None
        if spec.comparable and spec.key:
            correlation = key_correlation(source, name, spec.key[0])
            bucket_scan = bucket_scan_shape(
                spec, correlation, estimated, settings.bucket_scan_max_rows, settings.max_parallel_chunks
            )
            if bucket_scan is not None:
                groups = bucket_scan.groups
                scans = "one scan per side" if groups == 1 else f"{groups} chunks of one scan per side each"
                note = (
                    f"compared by {scans} in {2**bucket_scan.bits:,} buckets of its key: the key is in no"
                    f" physical order (correlation {correlation:.2f}), so key ranges would read every page many times"
                )
                spec = spec.model_copy(update={"notes": [*spec.notes, note]})
        specs.append(spec)
        if not spec.comparable or src is None:
            continue
        boundaries = (
            []
            if spec.multiset or bucket_scan is not None
            else key_boundaries(
                source,
                src,
                chunk_count(estimated, slice_rows),
                estimated=estimated,
                samples_per_part=SAMPLES_PER_SLICE,
                max_samples=MAX_SAMPLES,
            )
        )
        chunks += chunk_specs(spec, boundaries, settings, replication, bucket_scan=bucket_scan)
    return ValidationPlan(started_at=started, first_keys=settings.report_first_keys, tables=specs, chunks=chunks)
