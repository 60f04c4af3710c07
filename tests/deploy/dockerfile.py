"""A small Dockerfile reader: instructions per build stage, with line continuations joined."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    argument: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction such as CMD ["serve", ...]."""
        value = json.loads(self.argument)
        assert isinstance(value, list), f"{self.keyword} is not in exec form: {self.argument}"
        return [str(item) for item in value]


@dataclass(slots=True)
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def read_stages(path: Path) -> list[Stage]:
    """Build stages in file order; ARG lines before the first FROM are left out."""
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, argument = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = argument.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(Instruction(keyword, argument.strip()))
    return stages


def read_args(path: Path) -> dict[str, str]:
    """Default values of the ARG lines before the first FROM."""
    values: dict[str, str] = {}
    for line in _logical_lines(path.read_text()):
        keyword, _, argument = line.partition(" ")
        if keyword.upper() == "FROM":
            break
        if keyword.upper() == "ARG" and "=" in argument:
            name, _, default = argument.strip().partition("=")
            values[name] = default
    return values
