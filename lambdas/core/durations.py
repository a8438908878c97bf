"""How long something took or has been open, as a person reads it."""

from __future__ import annotations


def fmt_seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"
