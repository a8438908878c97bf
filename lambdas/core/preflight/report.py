"""The preflight report as text for a terminal (pure)."""

from __future__ import annotations

import textwrap

from lambdas.core.preflight.model import CheckResult, PreflightReport

_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def _wrap(text: str, indent: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ") or [indent]


def format_check(check: CheckResult, name_width: int, width: int = 120) -> list[str]:
    head = f"{_MARK[check.status]:<4}  {check.name:<{name_width}}  "
    lines = textwrap.wrap(check.measured, width=width, initial_indent=head, subsequent_indent=" " * len(head)) or [
        head.rstrip()
    ]
    indent = " " * 6
    for item in check.details:
        lines += _wrap(f"- {item}", indent, width)
    if check.remedy and check.status != "pass":
        lines += _wrap(f"fix: {check.remedy}", indent, width)
    return lines


def format_report(report: PreflightReport, width: int = 120) -> str:
    """One line per check (status, name, what was measured); details and the fix under each non-pass."""
    name_width = max((len(c.name) for c in report.checks), default=10)
    lines = [f"{'':<4}  {'check':<{name_width}}  measured", "-" * min(width, name_width + 40)]
    for check in report.checks:
        lines += format_check(check, name_width, width)
    passed = sum(1 for c in report.checks if c.status == "pass")
    verdict = "ready to migrate" if report.ok else "NOT ready: fix every FAIL above"
    lines.append("-" * min(width, name_width + 40))
    lines.append(
        f"preflight: {passed} passed, {len(report.warnings)} warning(s), {len(report.failures)} failed: {verdict}"
    )
    return "\n".join(lines)
