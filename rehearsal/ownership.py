"""Folders of throwaway processes (servers, pgbouncers) that clean up after a dead owner.

Each folder holds `owner.pid`. A guardian process, detached from the owner, polls that pid
and runs the folder's cleanup once the owner is gone (even after SIGKILL, when no atexit
hook runs); every start first reaps folders whose owner died. The module that owns a kind
of folder provides the cleanup and runs `python -m <module> --guard <pid> <folder>`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Cleanup = Callable[[Path], None]


def owner_alive(directory: Path) -> bool:
    try:
        pid = int((directory / "owner.pid").read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def reap_orphans(root: Path, cleanup: Cleanup) -> list[Path]:
    """Clean up every folder under `root` whose owner no longer exists."""
    reaped: list[Path] = []
    if not root.is_dir():
        return reaped
    for directory in root.iterdir():
        # Only our folders (they carry owner.pid); anything else here is not ours to remove.
        if (directory / "owner.pid").is_file() and not owner_alive(directory):
            cleanup(directory)
            reaped.append(directory)
    return reaped


def spawn_guardian(module: str, owner_pid: int, directory: Path) -> int:
    """Start `python -m <module> --guard <owner> <folder>`, detached from us."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--guard", str(owner_pid), str(directory)],
        cwd=str(Path(__file__).resolve().parent.parent),
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc.pid


def guard(owner_pid: int, directory: Path, cleanup: Cleanup) -> None:
    """The guardian's loop: until the folder is gone, clean it up when the owner dies."""

    def _finish(*_: object) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, _finish)
    while directory.exists():
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            cleanup(directory)
            return
        except PermissionError:
            pass
        time.sleep(0.5)


def guard_main(argv: list[str], cleanup: Cleanup) -> None:
    """`--guard <pid> <folder>` entry for a module's __main__."""
    if len(argv) == 4 and argv[1] == "--guard":
        guard(int(argv[2]), Path(argv[3]), cleanup)


def shared_root(root: Path) -> None:
    """The folder every owned folder lives in: sticky and world-writable, so root and the
    unprivileged user the servers run as can both create folders there."""
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(root, 0o1777)  # noqa: S103 - sticky: each user removes only their own


def new_folder(root: Path, prefix: str, owner_pid: int | None = None) -> tuple[Path, int]:
    """A fresh folder under `root` recording its owner (default: this process); returns it and the owner."""
    shared_root(root)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    owner = owner_pid or os.getpid()
    (directory / "owner.pid").write_text(str(owner))
    return directory, owner
