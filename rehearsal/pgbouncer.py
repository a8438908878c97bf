"""A throwaway pgbouncer on a free port, in front of the rehearsal's local servers.

Runs the Debian package's binary as the unprivileged 'postgres' user when the caller is
root (pgbouncer refuses root), with `pool_mode = transaction`, trust authentication on
127.0.0.1 and its admin console open to 'postgres'. Everything lives in one folder under
the shared servers root (`/tmp/zdm-servers/pgbouncer/`), which the unprivileged user can
reach (pytest's tmp folders are closed to it).

Backends are reached through their Unix sockets, each linked into a folder of its own
under one common port number (`<dir>/backends/<server>/.s.PGSQL.5432`): pgbouncer's host
list (how the router spreads reads) shares one port, and two local servers listen on
different ones; the link makes them look like two hosts on the same port.

Cleanup is reliable even when the caller dies, as for the servers: a guardian process
stops pgbouncer and removes its folder once the owning process is gone, and every start
first reaps pgbouncers whose owner died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rehearsal import ownership
from rehearsal.servers import DEFAULT_ROOT, SUPERUSER, PostgresServer, RunAs, ServerError, free_port

PGBOUNCER_ROOT = DEFAULT_ROOT / "pgbouncer"
BACKEND_SOCKET_PORT = 5432  # the port number every linked backend socket appears under

BASE_SETTINGS: dict[str, str] = {
    "listen_addr": "127.0.0.1",
    "unix_socket_dir": "",
    "auth_type": "trust",
    "admin_users": SUPERUSER,
    "pool_mode": "transaction",
    "max_client_conn": "1000",
    "default_pool_size": "20",
    "server_round_robin": "1",
    # A server that restarts (the source-crash fault) is tried again within a second, not after the 15 s default
    "server_login_retry": "1",
    "ignore_startup_parameters": "extra_float_digits",
    "log_connections": "0",
    "log_disconnections": "0",
}


def find_pgbouncer() -> Path:
    for candidate in (os.environ.get("PGBOUNCER"), shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ServerError("pgbouncer not found: run 'make setup' (installs Debian's pgbouncer) or set PGBOUNCER")


@dataclass(frozen=True)
class LocalBackend:
    """A database on a local server, reached by pgbouncer through the server's Unix socket."""

    server: PostgresServer
    dbname: str


@dataclass
class PgbouncerProcess:
    directory: Path
    port: int
    run_as: RunAs
    pid: int
    guardian_pid: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stopped: bool = field(default=False, repr=False)

    @property
    def config_path(self) -> Path:
        return self.directory / "pgbouncer.ini"

    @property
    def log_path(self) -> Path:
        return self.directory / "pgbouncer.log"

    def admin_dsn(self, user: str = SUPERUSER) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=pgbouncer user={user}"

    def dsn(self, alias: str, user: str = SUPERUSER) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={alias} user={user}"

    def backend(self, server: PostgresServer, dbname: str) -> str:
        """pgbouncer's connection string for `dbname` on `server` (links its socket on first use)."""
        return _link_backend(self.directory, self.run_as, LocalBackend(server, dbname))

    def is_running(self) -> bool:
        return _pgbouncer_alive(self.pid, self.directory)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """Stop at once, as a crash would."""
        _signal_pgbouncer(self.pid, self.directory, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def restart(self, timeout: float = 15.0) -> None:
        """Start it again after `kill`, on its port, with its pgbouncer.ini as it is now (as a supervisor would)."""
        proc = _launch(find_pgbouncer(), self.config_path, self.run_as)
        if not _listening(proc, self.port, timeout):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            raise ServerError(f"pgbouncer did not start again on port {self.port}: {self.log_tail(2000).strip()}")
        self.pid, self.process = proc.pid, proc

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.guardian_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.guardian_pid, signal.SIGTERM)
        _stop_and_remove(self.directory, self.pid)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)


def _link_backend(directory: Path, run_as: RunAs, backend: LocalBackend) -> str:
    server = backend.server
    folder = directory / "backends" / f"{server.name}-{server.port}"
    link = folder / f".s.PGSQL.{BACKEND_SOCKET_PORT}"
    if not link.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
        run_as.chown(folder.parent)
        run_as.chown(folder)
        link.symlink_to(server.socket_dir / f".s.PGSQL.{server.port}")
    return f"host={folder} port={BACKEND_SOCKET_PORT} dbname={backend.dbname}"


def _render(databases: Mapping[str, str], settings: Mapping[str, str]) -> str:
    lines = ["; written by rehearsal.pgbouncer; the router rewrites the [databases] lines", "[databases]"]
    lines += [f"{alias} = {conninfo}" for alias, conninfo in databases.items()]
    lines += ["", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _pgbouncer_alive(pid: int, directory: Path) -> bool:
    """Whether `pid` is still the pgbouncer of `directory` (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"pgbouncer" in cmdline and str(directory).encode() in cmdline


def _signal_pgbouncer(pid: int, directory: Path, sig: int) -> None:
    if _pgbouncer_alive(pid, directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_and_remove(directory: Path, pid: int | None = None) -> None:
    if pid is None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((directory / "pgbouncer.pid").read_text().strip())
    if pid is not None:
        _signal_pgbouncer(pid, directory, signal.SIGTERM)  # pgbouncer: immediate shutdown
        deadline = time.monotonic() + 5
        while _pgbouncer_alive(pid, directory) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.02)
        _signal_pgbouncer(pid, directory, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    shutil.rmtree(directory, ignore_errors=True)


def reap_orphans(root: Path = PGBOUNCER_ROOT) -> list[Path]:
    """Stop and remove pgbouncers whose owning process no longer exists."""
    return ownership.reap_orphans(root, _stop_and_remove)


def _accepting(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _launch(binary: Path, config: Path, run_as: RunAs) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(binary), str(config)],
        user=run_as.uid,
        group=run_as.gid,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Whether `proc` runs and accepts connections on `port` within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not _accepting(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.poll() is None and _accepting(port)


def start_pgbouncer(
    databases: Mapping[str, str | LocalBackend],
    *,
    settings: Mapping[str, str] | None = None,
    root: Path = PGBOUNCER_ROOT,
    owner_pid: int | None = None,
    guardian: bool = True,
    timeout: float = 15.0,
) -> PgbouncerProcess:
    """Start pgbouncer on a free port serving `databases` (alias -> connection string or local backend)."""
    binary = find_pgbouncer()
    run_as = RunAs.for_current_user()
    reap_orphans(root)
    ownership.shared_root(root.parent)
    directory, owner = ownership.new_folder(root, "pgbouncer-", owner_pid)
    run_as.chown(directory)
    guardian_pid = ownership.spawn_guardian("rehearsal.pgbouncer", owner, directory) if guardian else None
    try:
        resolved = {
            alias: _link_backend(directory, run_as, value) if isinstance(value, LocalBackend) else value
            for alias, value in databases.items()
        }
        userlist = directory / "userlist.txt"
        userlist.write_text(f'"{SUPERUSER}" ""\n')
        conf = dict(BASE_SETTINGS)
        conf.update(
            {
                "auth_file": str(userlist),
                "pidfile": str(directory / "pgbouncer.pid"),
                "logfile": str(directory / "pgbouncer.log"),
            }
        )
        conf.update(settings or {})
        for attempt in range(5):
            port = free_port()
            conf["listen_port"] = str(port)
            config = directory / "pgbouncer.ini"
            config.write_text(_render(resolved, conf))
            os.chmod(config, 0o644)
            proc = _launch(binary, config, run_as)
            if _listening(proc, port, timeout):
                return PgbouncerProcess(directory, port, run_as, proc.pid, guardian_pid, proc)
            log = (
                (directory / "pgbouncer.log").read_text(errors="replace")[-2000:]
                if (directory / "pgbouncer.log").exists()
                else ""
            )
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                raise ServerError(f"pgbouncer did not listen on port {port} within {timeout:g}s: {log.strip()}")
            proc.wait()
            if "Address already in use" in log and attempt < 4:
                continue  # someone took the port between our probe and the start
            raise ServerError(f"pgbouncer did not start: {log.strip()}")
        raise ServerError("could not find a free port for pgbouncer")  # pragma: no cover
    except BaseException:
        if guardian_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(guardian_pid, signal.SIGTERM)
        _stop_and_remove(directory)
        raise


if __name__ == "__main__":
    ownership.guard_main(sys.argv, _stop_and_remove)
