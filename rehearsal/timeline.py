"""What the rehearsal saw over time (the report's charts and phases), and how it tells the terminal."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Timeline:
    start: float
    lag_seconds: list[tuple[float, float]] = field(default_factory=list)
    lag_bytes: list[tuple[float, float]] = field(default_factory=list)
    reads_on_target: list[tuple[float, float]] = field(default_factory=list)
    writer_on_target: list[tuple[float, float]] = field(default_factory=list)
    phases: list[tuple[str, float, float, str]] = field(default_factory=list)  # name, start, end, status
    state_outputs: dict[str, Any] = field(default_factory=dict)  # last output of each state, from the history
    events: list[tuple[float, str]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.start

    def note(self, what: str) -> None:
        """Something that happened (a fault, a crash): on the terminal now, marked on the report's charts later."""
        at = self.now()
        self.events.append((at, what))
        say(f"[{at:7.1f}s] {what}")
