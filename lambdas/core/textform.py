"""The session settings that change a row's text form, pinned the same on every compared session.

A value's text form (what `::text`, `ROW(...)::text` and COPY produce) depends on session
settings: the same timestamptz prints differently under another TimeZone, a double under
another extra_float_digits, a bytea under another bytea_output, a money value under another
lc_monetary. Anything that hashes or compares text forms across two servers (the validator,
the rehearsal's row compare) pins these first, so equal data gives equal text on both.

extra_float_digits = 3 prints every float exactly (shortest round-trip form from PostgreSQL
12 on, 17 significant digits before), so 0.1 + 0.2 and 0.3 stay different.
"""

from __future__ import annotations

from psycopg2 import sql

from lambdas.core.db import Connection, execute

TEXT_FORM_SETTINGS: dict[str, str] = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "lc_monetary": "C",
}


def pin_text_form(conn: Connection) -> None:
    """Set every text-form setting for the session (one round trip); also decode results as UTF-8."""
    calls = sql.SQL(", ").join(sql.SQL("set_config(%s, %s, false)") for _ in TEXT_FORM_SETTINGS)
    params: list[str] = []
    for name, value in TEXT_FORM_SETTINGS.items():
        params += [name, value]
    execute(conn, sql.SQL("SELECT {}").format(calls), params)
    if conn.encoding != "UTF8":
        conn.set_client_encoding("UTF8")
