"""Sequence positions read and moved by the cutover (`sequences.read_position`, `sync_sequences`)."""

from __future__ import annotations

import pytest

from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.sequences import SequenceSyncError, read_position, sync_sequences
from lambdas.core.tables import TableName

ORDERS = TableName.parse("public.orders")
INVOICE_NO = TableName.parse("public.invoice_no_seq")
SCHEMA = (
    "CREATE SEQUENCE invoice_no_seq START 100000",
    "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " invoice_no bigint NOT NULL DEFAULT nextval('invoice_no_seq'))",
)


@pytest.mark.parametrize(
    ("statement", "expected_next"),
    [
        ("SELECT nextval('invoice_no_seq')", 100002),  # is_called: last value + increment
        ("SELECT setval('invoice_no_seq', 900000, false)", 900000),  # not called: the value itself
        ("ALTER SEQUENCE invoice_no_seq RESTART WITH 500000", 500000),
        ("SELECT 1", 100000),  # never used: its start
    ],
)
def test_the_next_value_is_read_as_nextval_would_return_it(
    fresh_dbs: tuple[str, str], statement: str, expected_next: int
) -> None:
    # Given a sequence handed out once, then moved (or not) in one of the ways an application does
    conn = connect(fresh_dbs[0])
    try:
        for ddl in SCHEMA:
            execute(conn, ddl)
        if statement != "SELECT 1":
            execute(conn, "SELECT nextval('invoice_no_seq')")
        execute(conn, statement)
        # When its position is read
        position = read_position(conn, INVOICE_NO)
        # Then it is what nextval() returns next
        assert position.next_value == expected_next == fetch_value(conn, "SELECT nextval('invoice_no_seq')")
    finally:
        conn.close()


def test_a_restarted_source_sequence_moves_the_target_past_its_next_value(fresh_dbs: tuple[str, str]) -> None:
    # Given invoice numbers moved on to a new block on the source (next: 900000, is_called false)
    source, target = connect(fresh_dbs[0]), connect(fresh_dbs[1])
    try:
        for conn in (source, target):
            for ddl in SCHEMA:
                execute(conn, ddl)
        execute(source, "INSERT INTO orders DEFAULT VALUES")
        execute(source, "SELECT setval('invoice_no_seq', 900000, false)")
        # When the sequences are synced (twice: a retried step)
        first = sync_sequences(source, target, [ORDERS], margin=100)
        again = sync_sequences(source, target, [ORDERS], margin=100)
        # Then the target hands out 900100, never a number the source has used or would use next
        synced = {str(s.sequence): s for s in first}
        assert synced["public.invoice_no_seq"].source_next == 900000
        assert fetch_value(target, "SELECT nextval('invoice_no_seq')") == 900100
        assert not any(s.changed for s in again)
    finally:
        source.close()
        target.close()


def test_a_sequence_the_role_may_not_read_is_an_error_naming_it(fresh_dbs: tuple[str, str]) -> None:
    # Given a role that sees the sequence in pg_sequences but may not read it
    admin = connect(fresh_dbs[0])
    role = "zdm_seq_reader_" + fresh_dbs[0].rsplit("dbname=", 1)[1].split()[0]
    try:
        for ddl in SCHEMA:
            execute(admin, ddl)
        execute(admin, f"CREATE ROLE {role} LOGIN")
        limited = connect(fresh_dbs[0] + f" user={role}")
        try:
            # When its position is read
            with pytest.raises(SequenceSyncError, match="invoice_no_seq: this role may not read it; GRANT SELECT"):
                read_position(limited, INVOICE_NO)
        finally:
            limited.close()
        # Then nothing pretended it was at its start value
    finally:
        execute(admin, f"DROP ROLE IF EXISTS {role}")
        admin.close()
