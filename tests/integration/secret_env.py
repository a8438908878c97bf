"""Servers that require a password (scram-sha-256) for role `app`, and a canary password to grep for."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rehearsal.servers import PostgresServer
from tests.conftest import server_pair

PASSWORD = "S3cr3t-Canary-91"

HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
"""


def secure(server: PostgresServer) -> None:
    server.psql(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE app LOGIN SUPERUSER REPLICATION PASSWORD '"
        + PASSWORD
        + "'"
    )
    hba = server.datadir / "pg_hba.conf"
    hba.write_text(HBA)
    server.run_as.chown(hba)
    server.psql("SELECT pg_reload_conf()")


def app_dsn(server: PostgresServer, dbname: str, password: str = PASSWORD) -> str:
    return f"host=127.0.0.1 port={server.port} dbname={dbname} user=app password={password}"


def log_of(server: PostgresServer) -> Path:
    return server.directory / "server.log"


@contextmanager
def secure_pair(prefix: str, settings: dict[str, str] | None = None) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    with server_pair(prefix, settings) as (source, target):
        for s in (source, target):
            secure(s)
        yield source, target


class LogMark:
    """What each server logged from now on."""

    def __init__(self, *servers: PostgresServer) -> None:
        self.servers = servers
        self.offsets = {s.name: (log_of(s).stat().st_size if log_of(s).exists() else 0) for s in servers}

    def text(self) -> str:
        out = []
        for s in self.servers:
            data = log_of(s).read_bytes()[self.offsets[s.name] :].decode(errors="replace")
            out.append(f"--- {s.name} ---\n{data}")
        return "\n".join(out)


def exc_text(exc: BaseException) -> str:
    """Everything an exception can show: str, repr, args, the whole chained traceback."""
    return "\n".join([str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc))])
