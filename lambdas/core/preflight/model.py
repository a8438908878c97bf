"""Preflight results: one named check each, and the report that holds them (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "warn"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    `measured` says what was found (e.g. "wal_level=replica"), `remedy` says exactly what to do
    about a fail or warn (empty on pass), `details` lists the individual findings (tables,
    columns, extensions...), never truncated, so nothing is skipped silently.
    """

    name: str
    status: Status
    measured: str
    remedy: str = ""
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "measured": self.measured,
            "remedy": self.remedy,
            "details": list(self.details),
        }


@dataclass(frozen=True)
class PreflightReport:
    checks: list[CheckResult]

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings do not block a migration)."""
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "warn"]

    def get(self, name: str) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no preflight check named {name!r}; checks: {', '.join(c.name for c in self.checks)}")

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}
