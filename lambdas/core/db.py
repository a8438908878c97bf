"""Connections and small query helpers over psycopg2.

DSNs carry passwords: they are never put into messages. `redact_dsn` gives a loggable form.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

Connection = psycopg2.extensions.connection
Cursor = psycopg2.extensions.cursor
Query = str | sql.Composable

# A value is quoted, or runs to the next unescaped space (libpq honours backslash escapes in both forms).
_PASSWORD_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:\\.|[^\s\\])+\\?)", re.IGNORECASE)
# The user name may be empty (postgresql://:secret@host: libpq then uses the OS user).
_URI_PASSWORD_RE = re.compile(r"(postgres(?:ql)?://[^:/@]*:)([^@]+)(@)")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by '***'."""
    return _URI_PASSWORD_RE.sub(r"\1***\3", _PASSWORD_RE.sub(r"\1***", dsn))


class DatabaseUnreachable(ConnectionError):
    pass


# What a server that went away answers with (shut down, crashed, starting again). Not class 08: a server
# sends it when a connection the statement itself opens fails (CREATE SUBSCRIPTION's to its publisher),
# while the session's own is fine; a connection of ours that fails has no SQLSTATE.
_SERVER_GONE = tuple(psycopg2.errors.lookup(code) for code in ("57P01", "57P02", "57P03"))


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says a server went away or could not be reached, not that a statement failed on it:
    what a retry after the server is back can get past."""
    if isinstance(exc, (DatabaseUnreachable, psycopg2.InterfaceError, *_SERVER_GONE)):  # InterfaceError: found closed
        return True
    # A connection dropped without a word ("server closed the connection unexpectedly") has no SQLSTATE; psycopg2
    # raises it as a bare OperationalError, or a bare DatabaseError in the middle of a COPY
    return type(exc) in (psycopg2.OperationalError, psycopg2.DatabaseError) and getattr(exc, "pgcode", None) is None


T = TypeVar("T")


def when_reachable(
    open_session: Callable[[], T],
    seconds: float,
    *,
    stop: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    interval: float = 1.0,
) -> T:
    """`open_session()` once the server answers: tried again every `interval` seconds while it fails with a
    lost connection (`connection_lost`), for up to `seconds`. Any other error, the last one past `seconds`, or
    the last one once `stop()` says so, is raised."""
    deadline = clock() + seconds
    while True:
        try:
            return open_session()
        except Exception as exc:
            if not connection_lost(exc) or stop() or clock() > deadline:
                raise
        sleep(interval)


class InvalidDsn(ValueError):
    """A DSN libpq cannot parse (a data error: never retried)."""


def _invalid_dsn() -> InvalidDsn:
    # libpq could not parse the string; its message quotes the offending word, which may be part of
    # a password (an unquoted one with a space): name neither.
    return InvalidDsn(
        "the connection string is not valid libpq syntax (not shown: it may hold a password); "
        "write key=value pairs and quote values holding spaces or quotes, e.g. password='a b'"
    )


def connect(dsn: str, *, application_name: str = "zdm", autocommit: bool = True, **kwargs: Any) -> Connection:
    """Open a connection; the error names the (redacted) DSN, never the password."""
    try:
        conn: Connection = psycopg2.connect(dsn, application_name=application_name, connect_timeout=10, **kwargs)
    except psycopg2.ProgrammingError:
        raise _invalid_dsn() from None
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnreachable(f"cannot connect to {redact_dsn(dsn)}: {reason}") from None
    if "connection_factory" not in kwargs:  # replication connections are always autocommit
        conn.autocommit = autocommit
    return conn


def fetch_all(
    conn: Connection, query: Query, params: Sequence[Any] | dict[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


def fetch_one(
    conn: Connection, query: Query, params: Sequence[Any] | dict[str, Any] | None = None
) -> tuple[Any, ...] | None:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchone()


def fetch_value(conn: Connection, query: Query, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    row = fetch_one(conn, query, params)
    return None if row is None else row[0]


def execute(conn: Connection, query: Query, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
    with conn.cursor() as cur:
        cur.execute(query, params)


def server_version_num(conn: Connection) -> int:
    return int(conn.server_version)


def settable(conn: Connection, settings: Sequence[tuple[str, str]]) -> dict[str, bool]:
    """Whether the role may set each (name, value), tried with SET LOCAL inside a transaction that is
    rolled back: nothing changes, and it answers for managed servers whose own rules (rds_superuser,
    GRANT SET ON PARAMETER) the catalog does not show. Names and values must be constants."""
    allowed: dict[str, bool] = {}
    autocommit = conn.autocommit
    if autocommit:
        conn.autocommit = False
    try:
        with conn.cursor() as cur:
            for name, value in settings:
                cur.execute("SAVEPOINT zdm_set_probe")
                try:
                    cur.execute(f"SET LOCAL {name} = {value}")
                    allowed[name] = True
                except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.CantChangeRuntimeParam):
                    allowed[name] = False
                cur.execute("ROLLBACK TO SAVEPOINT zdm_set_probe")
    finally:
        conn.rollback()
        if autocommit:
            conn.autocommit = True
    return allowed


# A database's or role's own statement_timeout and idle_in_transaction_session_timeout guard it from its
# applications; the migration's bulk sessions (a COPY of a table, a snapshot's transaction held between
# chunks, a compare) run for longer on purpose and are bounded by their callers instead (as pg_dump does).
UNBOUNDED_SESSION = (("statement_timeout", "0"), ("idle_in_transaction_session_timeout", "0"))


# PostgreSQL 14+ also ends a session idle outside a transaction for idle_session_timeout: a worker's target
# session between two chunks, or the engine's control sessions while a copy of hours runs elsewhere (a
# start then failed at its very end, creating the subscription). Older servers refuse the name.
IDLE_SESSION_TIMEOUT_VERSION = 140000


def unbound_session(conn: Connection) -> None:
    """Lift the server's statement, idle-in-transaction and idle-session timeouts for this session
    (`UNBOUNDED_SESSION`, and `keep_when_idle`)."""
    execute(conn, "; ".join(f"SET {name} = {value}" for name, value in UNBOUNDED_SESSION))
    keep_when_idle(conn)


def keep_when_idle(conn: Connection) -> None:
    """Lift the server's idle_session_timeout (PostgreSQL 14+) for a session that waits while the migration
    works elsewhere."""
    if server_version_num(conn) >= IDLE_SESSION_TIMEOUT_VERSION:
        execute(conn, "SET idle_session_timeout = 0")


def with_unbounded_session(dsn: str) -> str:
    """The DSN with `UNBOUNDED_SESSION` added to its startup options (what it already sets is kept), for a
    session the server opens itself: a subscription's walsender runs the table sync's COPY under them."""
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise _invalid_dsn() from None
    extra = " ".join(f"-c {name}={value}" for name, value in UNBOUNDED_SESSION)
    params["options"] = f"{params['options']} {extra}" if params.get("options") else extra
    return str(psycopg2.extensions.make_dsn(**params))
