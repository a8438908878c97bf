"""The validator against a brute-force comparison, on random tables in real PostgreSQL pairs.

Each seed builds one table on both servers: a random key (integer, bigint in or out of physical
order, uuid, text under C, the database's or an ICU collation, numeric, date, timestamptz, a
composite one, or none), random columns of many types, and values picked to trip a text form
(NULL against '', -0 against 0, 1.0 against 1.00, the same instant in another offset, jsonb key
order, '1 day' against '24 hours', non-ASCII text, bytea, arrays, integers whose 32-bit hash folds
alike). The target then loses rows, gains rows and has columns changed, at a rate from none to
half the table, so every path of the validator is taken (range aggregates and bisection, (key,
hash) lines and records, multisets). Settings are random too (chunk and slice sizes, md5 or the
fast hash, one or two workers).

The expected answer never comes from the injected changes: both tables are read in full, each
column as its text under pinned settings, and compared in Python. The validator must report
exactly that: the same missing, extra and changed keys, the same changed columns, the same
multiset rows and copies, and nothing else. A failure names its seed; `pytest -k 'seed_17'`
runs it again.

Under live logical replication, with a random writer on the source and rows tampered with on the
target where the writer never writes, the validator must report exactly what that comparison
finds once the writer has stopped and the target caught up: the tampered rows, nothing unsettled.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from psycopg2 import sql

from lambdas.core.config import LogicalSettings
from lambdas.core.db import connect, execute
from lambdas.core.engines.logical import LogicalEngine, LogicalReplicationPlan, ReplicationNames
from lambdas.core.lsn import current_lsn, wait_for_lsn
from lambdas.core.validation import Replication, ValidationSummary, validate
from rehearsal.servers import PostgresServer
from tests.conftest import server_pair
from tests.integration.pg16_env import pg16_bindir
from tests.integration.random_tables import (
    KEY_KINDS,
    TABLE,
    Answer,
    Case,
    RandomWriter,
    build_pair,
    canonical_keys,
    change_row,
    create_table,
    full_comparison,
    insert_row,
    insert_rows,
    make_case,
    random_row,
    read_row_texts,
)

SEEDS = range(56)


def reported(summary: ValidationSummary) -> Answer:
    """The validator's answer, as `full_comparison` gives it; its counts checked against its lists."""
    (table,) = summary.per_table
    for kind in (table.missing, table.extra, table.changed):
        assert kind.count == sum(d.copies for d in kind.first), "a count disagrees with its list"
    if table.multiset:
        return Answer(
            rows_missing=Counter({d.key[0]: d.copies for d in table.missing.first}),
            rows_extra=Counter({d.key[0]: d.copies for d in table.extra.first}),
        )
    return Answer(
        {tuple(d.key) for d in table.missing.first},
        {tuple(d.key) for d in table.extra.first},
        {tuple(d.key): set(d.columns) for d in table.changed.first},
    )


@pytest.fixture(scope="module")
def pg15_and_16() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair("rand15-16", target_bindir=pg16_bindir()) as pair:
        yield pair


@contextmanager
def one_database(servers: tuple[PostgresServer, PostgresServer], name: str) -> Iterator[tuple[str, str]]:
    """A database of `name` on both servers for the module (creating one per case would take longer than the
    cases); dropped after."""
    for server in servers:
        server.create_database(name)
    try:
        yield servers[0].dsn(name), servers[1].dsn(name)
    finally:
        for server in servers:
            server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def module_dbs(pg_pair: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[str, str]]:
    with one_database(pg_pair, "random_tables") as dsns:
        yield dsns


@pytest.fixture(scope="module")
def module_dbs_15_and_16(pg15_and_16: tuple[PostgresServer, PostgresServer]) -> Iterator[tuple[str, str]]:
    with one_database(pg15_and_16, "random_tables") as dsns:
        yield dsns


def without_the_table(dsns: tuple[str, str]) -> tuple[str, str]:
    """The pair, with the previous case's table dropped on both sides."""
    for dsn in dsns:
        conn = connect(dsn)
        try:
            execute(conn, sql.SQL("DROP TABLE IF EXISTS {}").format(TABLE.ident))
        finally:
            conn.close()
    return dsns


def check_case(src: str, tgt: str, case: Case) -> None:
    """Build the case's pair, validate it and hold the report against a full comparison."""
    build_pair(src, tgt, case)
    truth = full_comparison(src, tgt, case)
    summary = validate(src, tgt, [TABLE], case.settings, workers=case.workers)
    (table,) = summary.per_table
    assert table.problems == [] and summary.unsettled == 0, f"{case}: {table.problems}"
    assert reported(summary) == truth, str(case)
    assert summary.ok is (truth == Answer()), str(case)
    assert table.multiset is (case.key == "none")
    assert table.source_rows == len(read_row_texts(src, case)), str(case)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed_{s}")
def test_the_validator_reports_exactly_what_a_full_comparison_finds(module_dbs: tuple[str, str], seed: int) -> None:
    # Given a random table on both servers, the target's copy changed at random
    # When the validator compares them
    # Then it reports exactly what comparing every column of every row finds, and nothing else
    check_case(*without_the_table(module_dbs), make_case(seed))


@pytest.mark.parametrize("seed", range(14, 28), ids=lambda s: f"seed_{s}")
def test_across_postgresql_15_and_16_the_validator_reports_exactly_what_a_full_comparison_finds(
    module_dbs_15_and_16: tuple[str, str], seed: int
) -> None:
    # Given a random table on a PostgreSQL 15 source and a 16 target (one seed per key kind), changed at random
    case = make_case(seed)
    if KEY_KINDS[case.key].collation == "und-x-icu":
        case = replace(case, key="text-default")  # the PostgreSQL 16 build (pgserver) has no ICU
    # When validated, then exactly what a full comparison finds is reported
    check_case(*without_the_table(module_dbs_15_and_16), case)


# -- under live replication ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [112, 116, 119, 137], ids=lambda s: f"seed_{s}")
def test_under_live_replication_only_what_persists_is_reported_exactly(fresh_dbs: tuple[str, str], seed: int) -> None:
    # Given a random keyed table replicated by the logical engine, rows tampered with directly on the target
    # (changed, deleted, added) where the source's writer never writes, and that writer running
    src, tgt = fresh_dbs
    case = make_case(seed)
    assert case.key != "none"
    rng = random.Random(seed + 99)
    kind = KEY_KINDS[case.key]
    create_table(src, case, target=False)
    create_table(tgt, case, target=True)
    keys = canonical_keys(src, kind, sorted({kind.values(rng) for _ in range(case.rows * 3 + 30)}))
    rng.shuffle(keys)
    rows, rest = keys[: case.rows], keys[case.rows :]
    fresh, target_only = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    insert_rows(src, case, [random_row(case, rng, k) for k in rows], clustered=case.clustered)
    names = ReplicationNames(f"zdm_live{seed}")
    plan = LogicalReplicationPlan(names, (TABLE,), LogicalSettings(copy_workers=2, copy_chunk_rows=1000))
    engine = LogicalEngine(src, tgt, plan)
    engine.start()
    try:
        written = rng.sample(rows, len(rows) // 2)
        untouched = sorted(set(rows) - set(written))
        target = connect(tgt)
        tampered = rng.sample(untouched, min(len(untouched), max(1, round(len(untouched) * case.diff_rate))))
        deleted = set(rng.sample(tampered, len(tampered) // 3))
        for key in tampered:
            change_row(target, case, rng, key, delete=key in deleted)
        added = target_only[: len(tampered) // 3 + 1]
        for key in added:
            insert_row(target, case, random_row(case, rng, key))
        target.close()
        writer = RandomWriter(src, case, written, fresh)
        writer.start()
        time.sleep(0.5)
        # When the validator compares them while the writer runs
        replication = Replication(subscription=names.subscription, slot=names.slot, timeout_seconds=30, attempts=5)
        summary = validate(src, tgt, [TABLE], case.settings, workers=case.workers, replication=replication)
        writer.stopping.set()
        writer.join(10)
        assert writer.error is None and writer.committed > 100, writer.error
        source, target = connect(src), connect(tgt)
        wait_for_lsn(target, names.subscription, current_lsn(source), timeout=30, source=source, slot=names.slot)
        source.close()
        target.close()
        # Then it reports exactly what a full comparison finds once the writer stopped and the target caught
        # up (the tampered rows), nothing unsettled; the rows in flight only as transient
        truth = full_comparison(src, tgt, case)
        # (the copy and the replication left no other difference: only the tampered rows differ)
        assert (truth.missing, truth.extra) == (deleted, set(added)) and set(truth.changed) <= set(tampered)
        (table,) = summary.per_table
        assert table.problems == [] and summary.unsettled == 0, f"{case}: {table.problems} {table.unsettled}"
        assert reported(summary) == truth, str(case)
    finally:
        engine.teardown()
