"""The rehearsal's pgbouncer: unprivileged, on a free port, removed even when its owner crashes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambdas.core.db import connect, fetch_value
from rehearsal.pgbouncer import PGBOUNCER_ROOT, LocalBackend, reap_orphans, start_pgbouncer
from rehearsal.servers import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root() -> Iterator[Path]:
    """A root of our own under the shared folder (the unprivileged user must reach it)."""
    folder = PGBOUNCER_ROOT / f"test-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _owner_uid(pid: int) -> int:
    return Path(f"/proc/{pid}").stat().st_uid


def test_pgbouncer_serves_a_local_database_unprivileged_and_is_removed_on_stop(
    root: Path, pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    source, _ = pg_pair
    # When pgbouncer starts in front of the source
    pgb = start_pgbouncer({"app": LocalBackend(source, "postgres")}, root=root)
    try:
        # Then clients reach the source through it, and its admin console answers
        conn = connect(pgb.dsn("app"))
        assert fetch_value(conn, "SELECT current_setting('port')::int") == source.port
        conn.close()
        admin = connect(pgb.admin_dsn())
        with admin.cursor() as cur:
            cur.execute("SHOW DATABASES")
            assert "app" in {row[0] for row in cur.fetchall()}
        admin.close()
        # And it does not run as root
        if os.geteuid() == 0:
            assert _owner_uid(pgb.pid) != 0
        assert pgb.is_running()
    finally:
        pgb.stop()
    # And stopping it ends the process and removes its folder
    assert not pgb.is_running()
    assert not pgb.directory.exists()


def test_pgbouncer_of_a_killed_owner_is_stopped_and_removed(
    root: Path, pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    source, _ = pg_pair
    # Given a process that starts pgbouncer and is then killed with SIGKILL (no cleanup runs)
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from rehearsal.pgbouncer import start_pgbouncer
        pgb = start_pgbouncer({{"app": "host=127.0.0.1 port={source.port} dbname=postgres"}}, root=Path({str(root)!r}))
        print(pgb.directory, pgb.pid, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    directory_text, pid_text = owner.stdout.readline().split()
    directory, pid = Path(directory_text), int(pid_text)
    assert directory.exists() and Path(f"/proc/{pid}").exists()
    owner.kill()
    owner.wait()
    # Then its guardian stops pgbouncer and removes the folder
    deadline = time.monotonic() + 15
    while (directory.exists() or Path(f"/proc/{pid}/cmdline").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not directory.exists()
    assert not Path(f"/proc/{pid}/cmdline").exists() or b"pgbouncer" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_orphans_without_a_guardian_are_reaped_by_the_next_start(
    root: Path, pg_pair: tuple[PostgresServer, PostgresServer]
) -> None:
    source, _ = pg_pair
    # Given a pgbouncer whose recorded owner is gone and which has no guardian
    pgb = start_pgbouncer({"app": LocalBackend(source, "postgres")}, root=root, guardian=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (pgb.directory / "owner.pid").write_text(str(dead.pid))
    # When the orphans are reaped (every start does this first)
    reaped = reap_orphans(root)
    # Then it is stopped and removed
    assert pgb.directory in reaped
    assert not pgb.directory.exists() and not pgb.is_running()
    if pgb.process is not None:
        pgb.process.wait(timeout=5)
