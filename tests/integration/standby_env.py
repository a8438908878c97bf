"""A hot standby of a test server (pg_basebackup -R, streaming from it): what a read replica's endpoint
reaches when a migration file points at it by mistake."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rehearsal.servers import SUPERUSER, PostgresServer, ServerError, _start_postgres, _stop_and_remove, free_port


@contextmanager
def standby_of(primary: PostgresServer) -> Iterator[PostgresServer]:
    directory = Path(tempfile.mkdtemp(prefix="zdm-standby-"))
    primary.run_as.chown(directory)
    datadir, sockdir = directory / "data", directory / "sock"
    sockdir.mkdir()
    primary.run_as.chown(sockdir)
    try:
        backup = primary.run_as.run(
            [
                str(primary.bindir / "pg_basebackup"),
                *("-D", str(datadir), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
                *("-h", "127.0.0.1", "-p", str(primary.port), "-U", SUPERUSER),
            ]
        )
        if backup.returncode != 0:
            raise ServerError(f"pg_basebackup failed: {backup.stderr.strip()}")
        port = free_port()
        with (datadir / "postgresql.auto.conf").open("a") as conf:  # -R wrote primary_conninfo there
            conf.write(f"port = '{port}'\nunix_socket_directories = '{sockdir}'\n")
        _start_postgres(primary.bindir, datadir, primary.run_as, directory / "server.log", 60)
        yield PostgresServer("standby", port, directory, primary.bindir, primary.run_as)
    finally:
        _stop_and_remove(primary.bindir, directory, primary.run_as)
        shutil.rmtree(directory, ignore_errors=True)
