"""Throwaway helper processes (broker, connector, applier) that never outlive their owner.

Each runs in a folder of its own under the shared root, with its log there. A guardian stops
it once the owning process is gone (even after SIGKILL), and every start reaps the processes
of dead owners, as for the servers (rehearsal/ownership.py). A process is identified by its pid
and its start time, since pids get reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rehearsal import ownership
from rehearsal.servers import DEFAULT_ROOT, ServerError

PROCESS_ROOT = DEFAULT_ROOT / "processes"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _recorded(directory: Path) -> tuple[int, str] | None:
    try:
        pid_text, started = (directory / "process.pid").read_text().split()
        return int(pid_text), started
    except (OSError, ValueError):
        return None


def _alive(directory: Path) -> int | None:
    recorded = _recorded(directory)
    if recorded is None:
        return None
    pid, started = recorded
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap our own zombie child so that it reads as dead
    return pid if _start_time(pid) == started else None


def _stop_and_remove(directory: Path, grace: float = 10.0) -> None:
    _terminate(directory, grace)
    shutil.rmtree(directory, ignore_errors=True)


def _terminate(directory: Path, grace: float) -> None:
    pid = _alive(directory)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _alive(directory) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(directory) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def running_in(directory: Path) -> OwnedProcess | None:
    """The live process started in `directory`, if any."""
    pid = _alive(directory)
    return None if pid is None else OwnedProcess(directory.name, directory, pid, None)


def reap_orphans(root: Path = PROCESS_ROOT) -> list[Path]:
    return ownership.reap_orphans(root, _stop_and_remove)


@dataclass
class OwnedProcess:
    name: str
    directory: Path
    pid: int
    guardian_pid: int | None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.directory / "process.log"

    def is_running(self) -> bool:
        return _alive(self.directory) == self.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL, as a crash would (the folder stays, so the process can be started again).

        Returns once the process is gone: a start right after must not find it still running.
        """
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()
        deadline = time.monotonic() + timeout
        while _alive(self.directory) == self.pid and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self, grace: float = 10.0, *, remove: bool = True) -> None:
        """SIGTERM, then SIGKILL after `grace`; `remove=False` keeps the folder (to start again in it)."""
        if self.guardian_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.guardian_pid, signal.SIGTERM)
        if remove:
            _stop_and_remove(self.directory, grace)
        else:
            _terminate(self.directory, grace)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    ready: Callable[[OwnedProcess], bool] | None = None,
    timeout: float = 60.0,
    root: Path = PROCESS_ROOT,
    directory: Path | None = None,
) -> OwnedProcess:
    """Start `argv` in its own session, logging to <folder>/process.log; wait until `ready` says so.

    `directory`: an existing folder of this kind to start in again (a restart after a kill keeps
    what the process stored there, e.g. the connector's offsets).
    """
    reap_orphans(root)
    if directory is None:
        directory, owner = ownership.new_folder(root, f"{name}-")
    else:
        owner = os.getpid()
        (directory / "owner.pid").write_text(str(owner))
    guardian_pid = ownership.spawn_guardian("rehearsal.processes", owner, directory)
    try:
        with open(directory / "process.log", "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=str(Path(__file__).resolve().parent.parent),
                start_new_session=True,
            )
        started = _start_time(popen.pid)
        (directory / "process.pid").write_text(f"{popen.pid} {started}")
        proc = OwnedProcess(name, directory, popen.pid, guardian_pid, popen)
        deadline = time.monotonic() + timeout
        while ready is not None and not ready(proc):
            if popen.poll() is not None:
                raise ServerError(f"{name} exited with code {popen.returncode}:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{name} was not ready within {timeout:g}s:\n{proc.log_tail()}")
            time.sleep(0.05)
        return proc
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(guardian_pid, signal.SIGTERM)
        _stop_and_remove(directory)
        raise


if __name__ == "__main__":
    ownership.guard_main(sys.argv, _stop_and_remove)
