"""PostgreSQL 16 server binaries for the tests, from the pgserver wheel (requirements-dev.txt): Debian 12
packages only 15. The build has no contrib modules and no libxml."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def pg16_bindir() -> Path:
    spec = importlib.util.find_spec("pgserver")  # found, not imported: the package starts servers of its own
    assert spec is not None and spec.submodule_search_locations, "pgserver (requirements-dev.txt) is not installed"
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
