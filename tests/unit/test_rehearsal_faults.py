"""The rehearsal's faults: each one explained, listed in the README with the outcome its run must have."""

from __future__ import annotations

import re
from pathlib import Path

from rehearsal.__main__ import EXPECTED_OUTCOME
from rehearsal.faults import CRASHES, FAULT_HELP, FAULTS

README = Path(__file__).resolve().parents[2] / "README.md"
# How the README's table says each outcome starts
OUTCOME_WORDS = {"migrated": "migrated", "rolled_back": "rolled back", "reverse_replication_broken": "stopped"}


def _readme_faults() -> dict[str, str]:
    """Each fault the README's table names, with its "how it must end" cell."""
    rows: dict[str, str] = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in re.findall(r"`([a-z-]+)`", cells[0]):
                rows[name] = cells[2]
    return rows


def test_every_fault_has_its_help_and_every_crash_is_a_fault() -> None:
    assert set(FAULT_HELP) == set(FAULTS)
    assert set(CRASHES) <= set(FAULTS)


def test_the_readme_lists_every_fault_with_the_outcome_its_run_must_have() -> None:
    # Given the README's table of faults
    listed = _readme_faults()
    # Then it names every fault, and no other
    assert set(listed) == set(FAULTS)
    # And says how each must end as the rehearsal's exit code checks it
    for fault, ends in listed.items():
        expected = EXPECTED_OUTCOME.get(fault, "rolled_back")
        assert ends.startswith(OUTCOME_WORDS[expected]), (fault, ends, expected)
