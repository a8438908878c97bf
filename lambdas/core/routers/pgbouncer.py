"""pgbouncer as the router: PAUSE, repoint (rewrite pgbouncer.ini), RELOAD, RESUME.

- Writer: the writer alias's `[databases]` line is rewritten to the other backend and
  pgbouncer RELOADs it. While the alias is paused, server connections are already closed,
  so the first transaction after RESUME runs on the new database.
- Hold: `PAUSE <alias>` waits for the transactions running through the alias to finish,
  closes its server connections and queues every new transaction until `RESUME`: clients
  wait instead of failing (up to pgbouncer's `query_wait_timeout`). Both the writer and the
  reader alias are paused, so that no pooled server connection is used while the database
  fence ends old sessions. This needs `pool_mode = transaction` (or statement): in session
  mode a server connection is released only when its client disconnects, so PAUSE would wait
  for every client to leave.
- Reads: the reader alias gets a host list; pgbouncer opens server connections round-robin
  over it, so a list of 9 source entries and 1 target entry sends about 10% of new server
  connections to the target: a share of connections, not of queries (a pool with few server
  connections, or `server_round_robin = 0`, may send a client's reads all one way; 0 and 100 are
  exact). Weights are quantised to at most 20 entries,
  and all hosts of one list share one port and database name (pgbouncer's host list has one
  `port`), which is what two database servers normally have.

A pgbouncer quirk: a client that logs in while its alias is paused waits, like a query,
provided the pool has logged in to a server before (pgbouncer greets clients with the server
parameters learnt then). For a pool that never had a server connection, pgbouncer's attempt
to learn them is cut by the pause and retried only after `server_login_retry` (15 s by
default), so such a client waits that long after RESUME. Pools in use are not affected.

The router rewrites only the lines of its aliases; everything else in the file (comments,
other databases, settings) is kept byte for byte. Backends are given as libpq-style
`host=... port=... dbname=...` strings without a password (pgbouncer's `auth_file` or
`auth_query` supplies it): the router never writes a secret to disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from lambdas.core.db import Connection, connect, redact_dsn, when_reachable
from lambdas.core.routers.base import HoldHandle, RouterError, RouterState, Side, TrafficRouter, check_weight

MAX_HOST_ENTRIES = 20
# A restarted pgbouncer answers within milliseconds of listening: every writer refused meanwhile is a failed transaction
ADMIN_RECONNECT_INTERVAL_SECONDS = 0.1
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_PLAIN_VALUE_RE = re.compile(r"^[A-Za-z0-9_./,:@+-]+$")
_SECTION_RE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*$")


@dataclass(frozen=True)
class PgbouncerBackend:
    """Where pgbouncer connects for one database: host (or socket folder), port, database name."""

    host: str
    port: int
    dbname: str
    user: str | None = None

    @classmethod
    def parse(cls, conninfo: str, *, what: str = "backend") -> PgbouncerBackend:
        try:
            parts = psycopg2.extensions.parse_dsn(conninfo)
        except psycopg2.ProgrammingError:
            raise RouterError(
                f"pgbouncer {what} is not a connection string such as 'host=10.0.0.5 port=5432 dbname=orders'"
            ) from None
        if "password" in parts:
            raise RouterError(
                f"pgbouncer {what} holds a password: leave it out (pgbouncer's auth_file or auth_query supplies it; "
                "the router never writes a secret into pgbouncer.ini)"
            )
        unknown = sorted(set(parts) - {"host", "port", "dbname", "user"})
        if unknown:
            raise RouterError(f"pgbouncer {what}: only host, port, dbname and user are used; remove {unknown}")
        if "host" not in parts or "dbname" not in parts:
            raise RouterError(f"pgbouncer {what} needs host and dbname, e.g. 'host=10.0.0.5 port=5432 dbname=orders'")
        try:
            port = int(parts.get("port", "5432"))
        except ValueError:
            raise RouterError(f"pgbouncer {what}: port must be a number") from None
        return cls(parts["host"], port, parts["dbname"], parts.get("user"))


# -- pure helpers: host lists and pgbouncer.ini lines ------------------------------------------


def weighted_hosts(source_host: str, target_host: str, target_percent: int) -> tuple[list[str], int]:
    """A round-robin host list sending about `target_percent` of connections to the target.

    Returns the list and the percentage it really gives (quantised to at most 20 entries).
    Target entries are spread evenly through the list.
    """
    check_weight(target_percent)
    if target_percent == 0:
        return [source_host], 0
    if target_percent == 100:
        return [target_host], 100
    share = Fraction(target_percent, 100).limit_denominator(MAX_HOST_ENTRIES)
    if share == 0:
        share = Fraction(1, MAX_HOST_ENTRIES)
    if share == 1:
        share = Fraction(MAX_HOST_ENTRIES - 1, MAX_HOST_ENTRIES)
    entries, on_target = share.denominator, share.numerator
    hosts: list[str] = []
    placed = 0
    for i in range(entries):
        # Bresenham: a target entry whenever the running share passes the next whole one.
        due = (i + 1) * on_target // entries
        if due > placed:
            hosts.append(target_host)
            placed += 1
        else:
            hosts.append(source_host)
    return hosts, round(100 * on_target / entries)


def _quote(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise RouterError("a pgbouncer connection value cannot hold a line break")
    if _PLAIN_VALUE_RE.match(value):
        return value
    return "'" + value.replace("'", "''") + "'"


def database_line_value(hosts: Sequence[str], port: int, dbname: str, user: str | None = None) -> str:
    """The right-hand side of a `[databases]` line: `host=a,b port=5432 dbname=orders`."""
    for host in hosts:
        if "," in host:
            raise RouterError(f"host {host!r} holds a comma, which pgbouncer reads as a host list")
    parts = [f"host={_quote(','.join(hosts))}", f"port={int(port)}", f"dbname={_quote(dbname)}"]
    if user:
        parts.append(f"user={_quote(user)}")
    return " ".join(parts)


def _alias_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped[0] in ";#" or "=" not in stripped:
        return None
    key = stripped.split("=", 1)[0].strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('""', '"')
    return key


def set_database_entries(ini_text: str, entries: Mapping[str, str]) -> str:
    """`ini_text` with the `[databases]` lines of `entries` (alias -> value) replaced.

    Every other byte is kept. An alias that is not defined in `[databases]` is an error: the
    router repoints aliases, it does not invent them.
    """
    for alias in entries:
        _check_alias(alias)
    lines = ini_text.splitlines(keepends=True)
    section = None
    seen: set[str] = set()
    out: list[str] = []
    for line in lines:
        match = _SECTION_RE.match(line)
        if match:
            section = match.group(1).lower()
        elif section == "databases":
            key = _alias_of(line)
            if key is not None and key in entries:
                ending = "\r\n" if line.endswith("\r\n") else "\n"
                line = f"{key} = {entries[key]}{ending}"
                seen.add(key)
        out.append(line)
    missing = sorted(set(entries) - seen)
    if missing:
        raise RouterError(
            f"pgbouncer.ini has no [databases] line for {', '.join(missing)}: define each alias there once "
            "(the router only repoints existing aliases)"
        )
    return "".join(out)


def _check_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias):
        raise RouterError(
            f"pgbouncer alias {alias!r}: use letters, digits, '_', '.', '-' (at most 63), starting with a letter or digit"
        )
    return alias


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` in one rename, keeping its mode and owner (pgbouncer reads it)."""
    info = path.stat()
    fd, tmp_name = tempfile.mkstemp(prefix=".zdm-", dir=str(path.parent))
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, info.st_mode & 0o7777)
        with contextlib.suppress(PermissionError):
            os.chown(tmp, info.st_uid, info.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- the router ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DatabaseRow:
    host: str | None
    port: int | None
    database: str | None
    pool_mode: str | None
    paused: bool


class PgbouncerRouter(TrafficRouter):
    name = "pgbouncer"

    def __init__(
        self,
        admin_dsn: str,
        config_path: str | Path,
        *,
        writer_alias: str,
        source: PgbouncerBackend,
        target: PgbouncerBackend,
        reader_alias: str | None = None,
        connector: Callable[..., Connection] = connect,
        connect_timeout: float = 10.0,
        reconnect_seconds: float = 0.0,
    ) -> None:
        self._admin_dsn = admin_dsn
        self._config = Path(config_path)
        self.writer_alias = _check_alias(writer_alias)
        self.reader_alias = _check_alias(reader_alias) if reader_alias else None
        if self.reader_alias == self.writer_alias:
            raise RouterError("pgbouncer reader_alias must differ from database_alias (the writer's alias)")
        self._backends = {Side.SOURCE: source, Side.TARGET: target}
        self._connect = connector
        self._connect_timeout = connect_timeout
        self._reconnect_seconds = reconnect_seconds

    @property
    def holds_clients(self) -> bool:
        return True

    def backend(self, side: Side) -> PgbouncerBackend:
        return self._backends[side]

    def backend_conninfo(self, side: Side | str) -> str:
        """The backend as a `host=... port=... dbname=...` string (the migration file's form)."""
        backend = self._backends[Side(side)]
        return database_line_value([backend.host], backend.port, backend.dbname, backend.user)

    @property
    def aliases(self) -> list[str]:
        return [self.writer_alias] + ([self.reader_alias] if self.reader_alias else [])

    # -- admin console -----------------------------------------------------------------------
    def _admin(self) -> Connection:
        """The admin console, waiting up to `reconnect_seconds` for a pgbouncer that does not answer (restarting):
        restarted in the middle of a cutover, it no longer holds the writers, who meet the old database's fence
        until the writer is switched, so the cutover waits here rather than for the task's next retry."""
        return when_reachable(
            lambda: self._connect(self._admin_dsn, application_name="zdm-router"),
            self._reconnect_seconds,
            interval=ADMIN_RECONNECT_INTERVAL_SECONDS,
        )

    def _command(self, command: str, alias: str | None = None) -> None:
        admin = self._admin()
        try:
            with admin.cursor() as cur:
                if alias is None:
                    cur.execute(sql.SQL(command))
                else:
                    cur.execute(sql.SQL(command + " {}").format(sql.Identifier(alias)))
        finally:
            admin.close()

    def _databases(self) -> dict[str, _DatabaseRow]:
        admin = self._admin()
        try:
            with admin.cursor() as cur:
                cur.execute("SHOW DATABASES")
                columns = [c.name for c in cur.description or ()]
                rows = cur.fetchall()
        finally:
            admin.close()
        result = {}
        for row in rows:
            item = dict(zip(columns, row, strict=True))
            result[str(item["name"])] = _DatabaseRow(
                host=item.get("host"),
                port=int(item["port"]) if item.get("port") is not None else None,
                database=item.get("database"),
                pool_mode=item.get("pool_mode"),
                paused=bool(int(item.get("paused") or 0)),
            )
        return result

    def _row(self, rows: Mapping[str, _DatabaseRow], alias: str) -> _DatabaseRow:
        if alias not in rows:
            raise RouterError(
                f"pgbouncer does not serve a database named {alias!r}: define it in [databases] of {self._config}"
            )
        return rows[alias]

    def _reload(self) -> None:
        self._command("RELOAD")

    def _rewrite(self, entries: Mapping[str, str]) -> None:
        try:
            text = self._config.read_text(encoding="utf-8")
        except OSError as exc:
            raise RouterError(f"cannot read pgbouncer config {self._config}: {exc.strerror}") from None
        new_text = set_database_entries(text, entries)
        if new_text != text:
            write_atomically(self._config, new_text)

    # -- reads -----------------------------------------------------------------------------------
    def set_read_weight(self, target_percent: int) -> None:
        check_weight(target_percent)
        if self.reader_alias is None:
            if target_percent in (0, 100):
                return  # no reader alias: reads go through the writer's alias and move with it
            raise RouterError(
                "pgbouncer has no reader alias to shift reads by percentage: set router.pgbouncer.reader_alias to the "
                "database name read-only clients connect to"
            )
        source, target = self._backends[Side.SOURCE], self._backends[Side.TARGET]
        if 0 < target_percent < 100 and (source.port, source.dbname, source.user) != (
            target.port,
            target.dbname,
            target.user,
        ):
            raise RouterError(
                "pgbouncer spreads reads over a host list that shares one port and database name, but the source "
                f"and target backends differ (port {source.port}/{target.port}, dbname {source.dbname}/{target.dbname});"
                " give both the same port and dbname, or shift reads in one step (read_shift.steps: [100])"
            )
        hosts, _ = weighted_hosts(source.host, target.host, target_percent)
        chosen = target if target_percent == 100 else source
        self._rewrite({self.reader_alias: database_line_value(hosts, chosen.port, chosen.dbname, chosen.user)})
        self._reload()
        row = self._row(self._databases(), self.reader_alias)
        if (row.host, row.port, row.database) != (",".join(hosts), chosen.port, chosen.dbname):
            raise RouterError(
                f"pgbouncer still routes {self.reader_alias!r} elsewhere after RELOAD: check that {self._config} is the "
                "file this pgbouncer reads and that no %include overrides the alias"
            )

    # -- hold / release -------------------------------------------------------------------------
    def begin_hold(self) -> HoldHandle:
        rows = self._databases()
        for alias in self.aliases:
            mode = (self._row(rows, alias).pool_mode or self._pool_mode()).lower()
            if mode == "session":
                raise RouterError(
                    f"pgbouncer serves {alias!r} in session pooling: PAUSE would wait for every client to disconnect. "
                    "Use pool_mode = transaction for the migrated database"
                )
        return _PausingHold(self, self.aliases)

    def _pool_mode(self) -> str:
        admin = self._admin()
        try:
            with admin.cursor() as cur:
                cur.execute("SHOW CONFIG")
                for row in cur.fetchall():
                    if row[0] == "pool_mode":
                        return str(row[1])
        finally:
            admin.close()
        return "session"

    def release(self) -> None:
        rows = self._databases()
        for alias in self.aliases:
            if self._row(rows, alias).paused:
                try:
                    self._command("RESUME", alias)
                except psycopg2.Error as exc:
                    if "not paused" not in str(exc):
                        raise RouterError(f"pgbouncer RESUME {alias} failed: {_first_line(exc)}") from None

    def paused_aliases(self) -> list[str]:
        rows = self._databases()
        return [alias for alias in self.aliases if alias in rows and rows[alias].paused]

    # -- writer --------------------------------------------------------------------------------
    def switch_writer(self, side: Side) -> None:
        backend = self._backends[side]
        self._rewrite(
            {self.writer_alias: database_line_value([backend.host], backend.port, backend.dbname, backend.user)}
        )
        self._reload()
        if self._writer_of(self._row(self._databases(), self.writer_alias)) is not side:
            raise RouterError(
                f"pgbouncer still routes {self.writer_alias!r} elsewhere after RELOAD: check that {self._config} is the "
                "file this pgbouncer reads and that no %include overrides the alias"
            )

    def _writer_of(self, row: _DatabaseRow) -> Side | None:
        for side, backend in self._backends.items():
            if (row.host, row.port, row.database) == (backend.host, backend.port, backend.dbname):
                return side
        return None

    def state(self) -> RouterState:
        rows = self._databases()
        writer_row = self._row(rows, self.writer_alias)
        weight: int | None = None
        if self.reader_alias is not None:
            reader = self._row(rows, self.reader_alias)
            weight = self._weight_of(reader)
        holding = any(self._row(rows, a).paused for a in self.aliases)
        return RouterState(self._writer_of(writer_row), weight, holding)

    def _weight_of(self, row: _DatabaseRow) -> int | None:
        if row.host is None:
            return None
        hosts = row.host.split(",")
        source, target = self._backends[Side.SOURCE], self._backends[Side.TARGET]
        if len(hosts) == 1:
            side = self._writer_of(row)
            return None if side is None else (100 if side is Side.TARGET else 0)
        if any(h not in (source.host, target.host) for h in hosts):
            return None
        return round(100 * sum(h == target.host for h in hosts) / len(hosts))

    def describe(self) -> str:
        return f"pgbouncer at {redact_dsn(self._admin_dsn)} (config {self._config})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _PausingHold(HoldHandle):
    """PAUSE on one asynchronous admin connection per alias; done when every PAUSE returned.

    pgbouncer marks the alias paused as soon as it reads the command (new transactions queue
    from then on) and answers once the running ones have finished. `begin` returns only after
    SHOW DATABASES shows every alias paused, so nothing new starts on a server connection
    after it: the database fence may then end idle sessions without hitting a client.
    """

    holding = True

    def __init__(self, router: PgbouncerRouter, aliases: Sequence[str], confirm_timeout: float = 5.0) -> None:
        self._router = router
        self._pending: dict[str, Any] = {}
        self._cursors: list[Any] = []  # an asynchronous query lives only as long as its cursor
        try:
            for alias in aliases:
                conn = _async_connect(router._admin_dsn, router._connect_timeout)
                self._pending[alias] = conn
                cursor = conn.cursor()
                self._cursors.append(cursor)
                cursor.execute(sql.SQL("PAUSE {}").format(sql.Identifier(alias)).as_string(conn))
            deadline = time.monotonic() + confirm_timeout
            while set(aliases) - set(router.paused_aliases()):
                if time.monotonic() > deadline:
                    raise RouterError(f"pgbouncer did not mark {', '.join(aliases)} paused within {confirm_timeout:g}s")
                time.sleep(0.001)
        except BaseException:
            self.cancel()
            raise

    def done(self) -> bool:
        for alias, conn in list(self._pending.items()):
            try:
                state = conn.poll()
            except psycopg2.Error as exc:
                conn.close()
                del self._pending[alias]
                raise RouterError(f"pgbouncer PAUSE {alias} failed: {_first_line(exc)}") from None
            if state == psycopg2.extensions.POLL_OK:
                conn.close()
                del self._pending[alias]
        return not self._pending

    def cancel(self) -> None:
        for conn in self._pending.values():
            with contextlib.suppress(psycopg2.Error):
                conn.close()
        self._pending.clear()
        self._cursors.clear()
        self._router.release()

    def describe(self) -> str:
        if self.done():
            return "nothing"
        return f"transactions running through pgbouncer alias(es) {', '.join(sorted(self._pending))} to finish"


def _async_connect(dsn: str, timeout: float) -> Any:
    try:
        conn = psycopg2.connect(dsn, async_=True, application_name="zdm-router-pause")
    except psycopg2.OperationalError as exc:
        raise RouterError(f"cannot reach pgbouncer at {redact_dsn(dsn)}: {_first_line(exc)}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = conn.poll()
        except psycopg2.OperationalError as exc:
            conn.close()
            raise RouterError(f"cannot reach pgbouncer at {redact_dsn(dsn)}: {_first_line(exc)}") from None
        if state == psycopg2.extensions.POLL_OK:
            return conn
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            conn.close()
            raise RouterError(f"pgbouncer at {redact_dsn(dsn)} did not answer within {timeout:g}s")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
