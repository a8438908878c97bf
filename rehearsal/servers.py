"""Throwaway local PostgreSQL servers on free ports, with wal_level=logical.

Used by the rehearsal and, as fixtures, by the tests. initdb and postgres refuse to run as
root, so when the caller is root they run as an unprivileged user (the Debian 'postgres'
user). Cleanup is reliable even when the caller dies: each server gets a guardian process
that stops it and removes its directory once the owning process is gone, and every start
first reaps servers whose owner died.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rehearsal import ownership

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "zdm-servers"
UNPRIVILEGED_USER = "postgres"
SUPERUSER = "postgres"

# Settings every server gets: logical decoding on, room for slots and workers, and
# durability traded for speed (these servers hold only throwaway data).
BASE_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_logical_replication_workers": "8",
    "max_sync_workers_per_subscription": "4",
    "max_worker_processes": "24",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "log_min_messages": "warning",
    "log_statement": "none",
    "timezone": "UTC",
}


class ServerError(RuntimeError):
    pass


def find_pg_bindir(version: str | None = None) -> Path:
    """The folder of initdb/pg_ctl/postgres (Debian keeps them off PATH)."""
    candidates: list[Path] = []
    env_dir = os.environ.get("PG_BINDIR")
    if env_dir:
        candidates.append(Path(env_dir))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True)
        if version:
            versions = [p for p in versions if p.name == version]
        candidates += [p / "bin" for p in versions]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "postgres").exists():
            return folder
    raise ServerError(
        "PostgreSQL server binaries (initdb, postgres) not found: run 'make setup' "
        "(installs Debian's postgresql package) or set PG_BINDIR to their folder"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class RunAs:
    """Who the server processes run as: ourselves, or an unprivileged user when we are root."""

    uid: int | None
    gid: int | None

    @classmethod
    def for_current_user(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(None, None)
        try:
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
        except KeyError:
            raise ServerError(
                f"running as root, and user {UNPRIVILEGED_USER!r} (to run postgres as) does not exist: "
                "run 'make setup' or 'useradd --system postgres'"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid)

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def run(self, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, user=self.uid, group=self.gid, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


@dataclass
class PostgresServer:
    """One running server. `dsn(db)` gives a libpq DSN for its superuser."""

    name: str
    port: int
    directory: Path
    bindir: Path
    run_as: RunAs
    guardian_pid: int | None = None
    stopped: bool = field(default=False, repr=False)

    @property
    def datadir(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def psql(self, sql_text: str, dbname: str = "postgres") -> str:
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn(dbname),
                "-c",
                sql_text,
            ],
            text=True,
            capture_output=True,
        )
        if out.returncode != 0:
            raise ServerError(f"psql on {self.name} failed: {out.stderr.strip()}")
        return out.stdout.strip()

    def create_database(self, dbname: str) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'")
        if not exists:
            self.psql(f'CREATE DATABASE "{dbname}"')

    def is_running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists() and _pg_ctl_status(self.bindir, self.datadir, self.run_as)

    def kill(self) -> None:
        """Stop at once, as a crash would (used by fault injection)."""
        self.run_as.run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"])

    def restart(self, timeout: float = 30) -> None:
        _start_postgres(self.bindir, self.datadir, self.run_as, self.directory / "server.log", timeout)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.guardian_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.guardian_pid, signal.SIGTERM)
        _stop_and_remove(self.bindir, self.directory, self.run_as)


def _pg_ctl_status(bindir: Path, datadir: Path, run_as: RunAs) -> bool:
    return run_as.run([str(bindir / "pg_ctl"), "-D", str(datadir), "status"]).returncode == 0


def _start_postgres(bindir: Path, datadir: Path, run_as: RunAs, logfile: Path, timeout: float) -> None:
    result = run_as.run(
        [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(logfile), "-w", "-t", str(int(timeout)), "start"]
    )
    if result.returncode != 0:
        tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else result.stderr
        raise ServerError(f"postgres in {datadir} did not start: {tail.strip()}")


def _stop_and_remove(bindir: Path, directory: Path, run_as: RunAs) -> None:
    datadir = directory / "data"
    if (datadir / "postmaster.pid").exists():
        run_as.run([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", "stop"])
    shutil.rmtree(directory, ignore_errors=True)


def _cleanup(directory: Path) -> None:
    bindir_file = directory / "bindir"
    if bindir_file.exists():
        _stop_and_remove(Path(bindir_file.read_text()), directory, RunAs.for_current_user())
    else:
        shutil.rmtree(directory, ignore_errors=True)


def reap_orphans(root: Path = DEFAULT_ROOT) -> list[Path]:
    """Stop and remove servers whose owning process no longer exists."""
    return ownership.reap_orphans(root, _cleanup)


def start_server(
    name: str = "pg",
    *,
    port: int | None = None,
    settings: Mapping[str, str] | None = None,
    root: Path = DEFAULT_ROOT,
    owner_pid: int | None = None,
    guardian: bool = True,
    timeout: float = 60,
    bindir: Path | None = None,
) -> PostgresServer:
    """initdb + start one server on a free port (or `port`, which must be free), from `bindir` (default:
    `find_pg_bindir`)."""
    bindir = bindir or find_pg_bindir()
    run_as = RunAs.for_current_user()
    reap_orphans(root)
    ownership.shared_root(root)
    if port is not None and not port_is_free(port):
        raise ServerError(f"port {port} on 127.0.0.1 is already in use: stop what listens there or choose another port")
    directory, owner = ownership.new_folder(root, f"{name}-", owner_pid)
    (directory / "bindir").write_text(str(bindir))
    run_as.chown(directory)
    datadir = directory / "data"
    sockdir = directory / "sock"
    sockdir.mkdir()
    run_as.chown(sockdir)
    guardian_pid = ownership.spawn_guardian("rehearsal.servers", owner, directory) if guardian else None
    try:
        init = run_as.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ]
        )
        if init.returncode != 0:
            raise ServerError(f"initdb failed: {init.stderr.strip()}")
        conf = dict(BASE_SETTINGS)
        conf.update(settings or {})
        for attempt in range(5):
            chosen = port if port is not None else free_port()
            conf["port"] = str(chosen)
            conf["listen_addresses"] = "'127.0.0.1'"
            conf["unix_socket_directories"] = f"'{sockdir}'"
            lines = [f"{k} = {v if v.startswith(chr(39)) else chr(39) + v + chr(39)}" for k, v in conf.items()]
            (datadir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")
            run_as.chown(datadir / "postgresql.auto.conf")
            try:
                _start_postgres(bindir, datadir, run_as, directory / "server.log", timeout)
            except ServerError:
                if port is None and attempt < 4 and not port_is_free(chosen):
                    continue  # someone took the port between our probe and the start
                raise
            return PostgresServer(name, chosen, directory, bindir, run_as, guardian_pid)
        raise ServerError("could not find a free port")  # pragma: no cover
    except BaseException:
        if guardian_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(guardian_pid, signal.SIGTERM)
        _stop_and_remove(bindir, directory, run_as)
        raise


@contextlib.contextmanager
def running_servers(names: list[str], **kwargs: object) -> Iterator[list[PostgresServer]]:
    """Start one server per name; all are stopped and removed on exit, whatever happens."""
    servers: list[PostgresServer] = []
    try:
        for n in names:
            servers.append(start_server(n, **kwargs))  # type: ignore[arg-type]
        yield servers
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    ownership.guard_main(sys.argv, _cleanup)
