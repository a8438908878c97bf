"""cfn-lint on the synthesized templates: no errors (warnings are printed for the record)."""

from __future__ import annotations

import json

from cfnlint.api import lint

from tests.infrastructure.conftest import Synth


def test_cfn_lint_finds_no_errors(shipped: Synth) -> None:
    matches = lint(json.dumps(shipped.json), regions=["eu-west-1"])
    errors = [m for m in matches if m.rule.id.startswith("E")]
    for match in matches:
        print(f"{match.rule.id} {match.message}")
    assert not errors, "\n".join(f"{m.rule.id} {m.message} at {'/'.join(map(str, m.path))}" for m in errors)
