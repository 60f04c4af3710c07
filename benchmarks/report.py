"""Markdown tables and number formatting for BENCHMARKS.md."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Table:
    """A titled Markdown table with notes under it."""

    title: str
    headers: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "| " + " | ".join("---" for _ in self.headers) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines) + "\n"


def ms(seconds: float, digits: int = 2) -> str:
    """Format seconds as milliseconds."""
    return f"{seconds * 1e3:.{digits}f} ms"


def ratio(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}x"


def count(value: float) -> str:
    """Format a large count with thousands separators and no decimals."""
    return f"{value:,.0f}"


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def render_machine(machine: dict[str, str], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    lines += [f"- {key}: {value}" for key, value in machine.items()]
    return "\n".join(lines) + "\n"
