"""One-statement helpers for tests that set up or read a database by DSN (a session each)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2 import sql

from lambdas.core.db import connect, execute, fetch_all


def run_sql(dsn: str, statement: str | sql.Composable, params: Sequence[object] | None = None) -> None:
    conn = connect(dsn)
    try:
        execute(conn, statement, params)
    finally:
        conn.close()


def query(dsn: str, statement: str | sql.Composable, params: Sequence[object] | None = None) -> list[tuple[Any, ...]]:
    conn = connect(dsn)
    try:
        return fetch_all(conn, statement, params)
    finally:
        conn.close()
