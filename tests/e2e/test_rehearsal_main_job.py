"""The README's main job at small scale: servers, preflight, copy under writes, streaming, compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_rehearsal_replicates_under_load_and_loses_no_row(tmp_path: Path) -> None:
    # When the rehearsal runs end to end as a user would start it
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rehearsal", "--rows", "50000", "--stream-seconds", "3", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # Then every row arrived, under writes, with nothing lost or different
    assert summary["outcome"] == "replicated"
    assert summary["rows_copied"] >= 50_000
    assert summary["workload"]["committed"] > 0 and summary["workload"]["failed"] == 0
    assert summary["rows_lost"] == 0 and summary["rows_differing"] == 0
    assert summary["rows_compared"] >= 50_000
    assert summary["sequences_synced"] == 4
    assert all(status != "fail" for status in summary["preflight"].values())
    # And progress and the summary were shown on the terminal
    assert "copy:" in proc.stderr and "rows compared" in proc.stderr
