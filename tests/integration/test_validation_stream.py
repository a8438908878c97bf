"""Reading a statement's binary records as a stream (`session.CopyStream`) from a real server."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg2.errors
import pytest
from psycopg2 import sql

from lambdas.core.db import Connection, connect, fetch_all, fetch_value
from lambdas.core.validation.session import CopyStream, RecordFrames, prepare_session

EIGHT_BYTE_RECORDS = sql.SQL("SELECT int8send(g) FROM generate_series(1, %s) g ORDER BY g")


def test_a_stream_hands_over_every_record_in_order_and_puts_its_settings_back(fresh_dbs: tuple[str, str]) -> None:
    # Given a session, and 200,000 eight-byte records read through a pipe 64 KB at a time
    src, _ = fresh_dbs
    conn = connect(src)
    try:
        prepare_session(conn)
        frames = RecordFrames(8, block_bytes=64 << 10)
        # When streamed under changed settings
        with CopyStream(conn, EIGHT_BYTE_RECORDS, [200_000], frames, {"work_mem": "8MB"}, read_bytes=64 << 10) as s:
            blocks = list(s)
        # Then every record came, in order, over many blocks, and the session is as it was
        data = b"".join(blocks)
        assert frames.rows == 200_000 and len(blocks) > 10
        assert [int.from_bytes(data[i * 14 + 6 : i * 14 + 14], "big") for i in (0, 1, 199_999)] == [1, 2, 200_000]
        assert fetch_value(conn, "SHOW work_mem") != "8MB"
        assert fetch_value(conn, "SELECT 1") == 1
    finally:
        conn.close()


def test_an_error_on_the_server_mid_stream_reaches_the_reader(fresh_dbs: tuple[str, str]) -> None:
    # Given a statement that fails after sending rows (a division by zero at the 50,000th)
    src, _ = fresh_dbs
    conn = connect(src)
    try:
        query = sql.SQL("SELECT int8send(100 / (50000 - g)) FROM generate_series(1, 100000) g")
        # When streamed / Then reading raises the server's error, not an end of the records
        with (
            pytest.raises(psycopg2.errors.DivisionByZero),
            CopyStream(conn, query, [], RecordFrames(8, block_bytes=1), read_bytes=4096) as stream,
        ):
            list(stream)
    finally:
        conn.close()


def test_closing_a_stream_early_cancels_its_statement(fresh_dbs: tuple[str, str]) -> None:
    # Given a stream whose statement sorts 30M rows before it sends one, and a reader that gives up at once
    # (as when the other side's stream failed)
    src, _ = fresh_dbs
    conn, watcher = connect(src), connect(src)
    try:
        pid = fetch_value(conn, "SELECT pg_backend_pid()")
        stream = CopyStream(conn, EIGHT_BYTE_RECORDS, [30_000_000], RecordFrames(8))
        with stream:
            # (the statement is running)
            assert wait_for(lambda: active(watcher, pid))
        # Then leaving the block ended the statement on the server: the backend runs nothing any more
        assert not active(watcher, pid)
    finally:
        conn.close()
        watcher.close()


def active(conn: Connection, pid: int) -> bool:
    rows = fetch_all(conn, "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
    return bool(rows) and rows[0][0] == "active"


def wait_for(check: Callable[[], bool], attempts: int = 200) -> bool:
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.02)
    return False
