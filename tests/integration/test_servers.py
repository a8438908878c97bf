"""Throwaway servers: started on free ports as an unprivileged user, removed even when the owner crashes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lambdas.core.db import connect, fetch_value
from rehearsal.servers import DEFAULT_ROOT, ServerError, reap_orphans, start_server


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A root of our own under the servers' shared folder (pytest's tmp dirs are closed to the
    unprivileged user the servers run as when we are root)."""
    root = DEFAULT_ROOT / f"test-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    os.chmod(root, 0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_server_runs_with_logical_wal_on_a_free_port_and_is_removed_on_stop(tmp_path: Path) -> None:
    server = start_server("probe", root=tmp_path)
    try:
        conn = connect(server.dsn())
        assert fetch_value(conn, "SHOW wal_level") == "logical"
        if os.geteuid() == 0:
            # postgres refuses root: the server process must belong to another user
            owner = fetch_value(conn, "SELECT pg_catalog.current_setting('data_directory')")
            assert Path(owner).stat().st_uid != 0
        conn.close()
    finally:
        server.stop()
    assert not server.directory.exists()


def test_busy_port_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    server = start_server("busy", root=tmp_path)
    try:
        with pytest.raises(ServerError, match=f"port {server.port} .* already in use"):
            start_server("second", root=tmp_path, port=server.port)
    finally:
        server.stop()


def test_servers_of_a_killed_owner_are_stopped_and_removed(tmp_path: Path) -> None:
    # Given a process that starts a server and is then killed with SIGKILL (no cleanup runs)
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from rehearsal.servers import start_server
        s = start_server("orphan", root=Path({str(tmp_path)!r}))
        print(s.port, s.directory, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    assert proc.stdout is not None
    port_text, directory_text = proc.stdout.readline().split()
    directory = Path(directory_text)
    assert directory.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Then its guardian stops the server and removes its directory
    deadline = time.monotonic() + 20
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not directory.exists()
    with pytest.raises(ConnectionError):
        connect(f"host=127.0.0.1 port={port_text} dbname=postgres user=postgres")


def test_reaper_removes_leftovers_whose_owner_is_gone(tmp_path: Path) -> None:
    # Given a server started without a guardian for an owner pid that no longer exists
    dead = subprocess.Popen(["true"])
    dead.wait()
    server = start_server("leftover", root=tmp_path, owner_pid=dead.pid, guardian=False)
    # When anyone reaps (every start does this first)
    reaped = reap_orphans(tmp_path)
    # Then the server is stopped and its directory gone
    assert server.directory in reaped
    assert not server.directory.exists()
