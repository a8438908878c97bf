"""Settings under which a server keeps a statement's text (CREATE SUBSCRIPTION's holds a password).

The engines switch them off around CREATE SUBSCRIPTION where the role may change them; preflight
warns where it may not and the server's values would keep the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdas.core.db import Connection, fetch_all, fetch_value, settable

# A failed statement is logged when log_min_error_statement is at or below ERROR.
_LEVELS_LOGGING_ERRORS = {"debug5", "debug4", "debug3", "debug2", "debug1", "info", "notice", "warning", "error"}


def settings_keeping_statements(conn: Connection) -> tuple[tuple[str, str], ...]:
    """Every setting under which the server keeps a statement's text, with the value that stops it:
    logged on error (log_min_error_statement), as DDL or all (log_statement), by its duration
    (log_min_duration_statement, _sample) or as part of a sampled transaction
    (log_transaction_sample_rate); tracked by pg_stat_statements; written to the audit log by pgaudit."""
    settings = [("log_min_error_statement", "panic"), ("log_statement", "none"), ("log_min_duration_statement", "-1")]
    version = int(conn.server_version)
    if version >= 120000:
        settings.append(("log_transaction_sample_rate", "0"))
    if version >= 130000:
        settings.append(("log_min_duration_sample", "-1"))
    # pg_stat_statements (on by default on RDS) keeps utility statements' text, readable by pg_read_all_stats
    if fetch_value(conn, "SELECT 1 FROM pg_settings WHERE name = 'pg_stat_statements.track_utility'"):
        settings.append(("pg_stat_statements.track_utility", "off"))
    # pgaudit (an RDS and Aurora option) logs DDL with its whole text, CONNECTION string included
    if fetch_value(conn, "SELECT 1 FROM pg_settings WHERE name = 'pgaudit.log'"):
        settings.append(("pgaudit.log", "none"))
    return tuple(settings)


@dataclass(frozen=True)
class LogSetting:
    name: str
    value: str  # the session's current value (the server's, unless the role or database overrides it)
    can_set: bool  # the role may change it for its session

    @property
    def keeps_statements(self) -> bool:
        """Whether, at this value, a CREATE SUBSCRIPTION's text can end up in the log or in pg_stat_statements."""
        value = self.value.strip().lower()
        if self.name == "log_min_error_statement":
            return value in _LEVELS_LOGGING_ERRORS
        if self.name == "log_statement":
            return value in ("ddl", "all")
        if self.name in ("log_min_duration_statement", "log_min_duration_sample"):
            return _number(value) >= 0
        if self.name == "log_transaction_sample_rate":
            return _number(value) > 0
        if self.name == "pgaudit.log":
            return pgaudit_logs_ddl(value)
        return value == "on"  # pg_stat_statements.track_utility


def pgaudit_logs_ddl(value: str) -> bool:
    """Whether pgaudit.log's classes include DDL (CREATE and ALTER SUBSCRIPTION): read left to right as
    pgaudit does, a class added, or taken away when it starts with '-'; ALL holds DDL, NONE adds nothing."""
    logged = False
    for token in value.split(","):
        name = token.strip().lower()
        subtract = name.startswith("-")
        if name.lstrip("-") in ("ddl", "all"):
            logged = not subtract
    return logged


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0  # a value with a unit ("250ms") is a duration >= 0


def log_settings(conn: Connection) -> tuple[LogSetting, ...]:
    """Each setting of `settings_keeping_statements` with its value and whether the role may change it
    (`db.settable`: probed, nothing changes)."""
    settings = settings_keeping_statements(conn)
    names = [name for name, _ in settings]
    values = {
        str(n): str(v)
        for n, v in fetch_all(conn, "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (names,))
    }
    allowed = settable(conn, settings)
    return tuple(LogSetting(name, values.get(name, ""), allowed[name]) for name in names)
