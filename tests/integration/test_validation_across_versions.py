"""The validator between a PostgreSQL 15 source and a PostgreSQL 16 target (a major-version upgrade, what
many migrations are): both row hashes give the same hash for the same data across the versions, and
every injected difference is named, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lambdas.core.config import Validation
from lambdas.core.validation import RowHash, SessionPair, plan_validation, validate
from rehearsal.servers import PostgresServer
from tests.conftest import server_pair
from tests.integration.db_env import run_sql
from tests.integration.pg16_env import pg16_bindir
from tests.integration.test_validation import KINDS, KINDS_SQL, listed

# One change per row, each of a kind the validator must see (tests/integration/test_validation.py's CASES)
CHANGES = """
DELETE FROM kinds WHERE id = 1500;
INSERT INTO kinds (id, label) VALUES (3001, 'new'), (-5, 'new');
UPDATE kinds SET note = '' WHERE id = 7;
UPDATE kinds SET note = NULL WHERE id = 8;
UPDATE kinds SET ratio = 0.1::float8 + 0.2::float8 WHERE id = 10;
SET TimeZone = 'Asia/Tokyo'; UPDATE kinds SET at = '2024-01-01 00:11:00' WHERE id = 11;
UPDATE kinds SET doc = '{"a": 12, "b": "y"}' WHERE id = 12;
UPDATE kinds SET amount = 13.00 WHERE id = 13;
UPDATE kinds SET blob = blob || '\\x00'::bytea WHERE id = 14;
UPDATE kinds SET name = normalize(name, NFD) WHERE id = 16;
UPDATE kinds SET label = 'other', ratio = -1 WHERE id = 2999;
"""
EXPECTED = {
    "missing": [(["1500"], [])],
    "extra": [(["-5"], []), (["3001"], [])],
    "changed": [
        (["7"], ["note"]),
        (["8"], ["note"]),
        (["10"], ["ratio"]),
        (["11"], ["at"]),
        (["12"], ["doc"]),
        (["13"], ["amount"]),
        (["14"], ["blob"]),
        (["16"], ["name"]),
        (["2999"], ["label", "ratio"]),
    ],
}


@pytest.fixture(scope="module")
def pg15_and_16() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair("x15-16", target_bindir=pg16_bindir()) as pair:
        yield pair


@pytest.mark.parametrize(("row_hash", "expected"), [("auto", RowHash.FAST), ("md5", RowHash.MD5)])
def test_a_postgresql_15_source_and_16_target_hash_alike_and_every_difference_is_named(
    pg15_and_16: tuple[PostgresServer, PostgresServer], row_hash: str, expected: RowHash
) -> None:
    # Given the same 3,000 rows of every column type on a PostgreSQL 15 source and a 16 target
    source, target = pg15_and_16
    db = f"x_{row_hash}"
    for server in (source, target):
        server.create_database(db)
    src, tgt = source.dsn(db), target.dsn(db)
    assert [server.psql("SHOW server_version_num", db)[:2] for server in (source, target)] == ["15", "16"]
    for dsn in (src, tgt):
        run_sql(dsn, KINDS_SQL)
    settings = Validation(chunk_rows=1_000, slice_rows=200, report_first_keys=50, row_hash=row_hash)
    # When validated
    with SessionPair.open(src, tgt) as pair:
        plan = plan_validation(pair, [KINDS], settings)
    identical = validate(src, tgt, [KINDS], settings, workers=2)
    # Then the fast row hash was found to agree across the versions (auto keeps it), and nothing differs
    assert plan.tables[0].row_hash is expected
    assert identical.ok and identical.differences == 0 and identical.rows_compared == 3_000
    # When one change of each kind is made on the target
    run_sql(tgt, CHANGES)
    changed = validate(src, tgt, [KINDS], settings, workers=2)
    # Then each is named, with its columns, and nothing else
    found = listed(changed)
    assert {kind: sorted(found.get(kind, []), key=lambda d: int(d[0][0])) for kind in EXPECTED} == {
        kind: sorted(items, key=lambda d: int(d[0][0])) for kind, items in EXPECTED.items()
    }
    assert set(found) == set(EXPECTED)
