"""The exception that stops a training process when nanwatch halts a run, and the wording of halt reasons."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanwatch.v1 import nanwatch_pb2 as pb

DEFAULT_HALT_EXIT_CODE = 42
HALT_EXIT_CODE_ENV = "NANWATCH_HALT_EXIT_CODE"


def skipped_before_halt(count: int) -> str:
    """Return "after N skipped updates in a row" for a halt that the skip policy delayed, or "" when count <= 0."""
    if count <= 0:
        return ""
    return f"after {count} skipped update{'' if count == 1 else 's'} in a row"


def halt_exit_code() -> int:
    """Return the exit code for a halted process: $NANWATCH_HALT_EXIT_CODE or 42."""
    raw = os.environ.get(HALT_EXIT_CODE_ENV, "")
    if not raw:
        return DEFAULT_HALT_EXIT_CODE
    try:
        code = int(raw)
    except ValueError:
        raise ValueError(
            f"{HALT_EXIT_CODE_ENV}={raw!r} is not an integer; set it to an exit code in 1..255"
        ) from None
    if not 1 <= code <= 255:
        raise ValueError(f"{HALT_EXIT_CODE_ENV}={code} is outside 1..255; pick an exit code in that range")
    return code


class HaltError(SystemExit):
    """Raised on every rank when nanwatch halts a run, before the optimizer update.

    It derives from ``SystemExit`` so that a broad ``except Exception`` in a
    training loop does not swallow it, and so that a process that does not catch
    it exits with the halt exit code (default 42, see ``halt_exit_code``). A
    Kubernetes Job can then fail at once on that code instead of retrying.

    Attributes:
        step: optimizer step at which every rank stopped; its update was not applied.
        reason: one-line description of the cause.
        finding: the finding behind the halt, when one is known.
        source: "local" (this rank's own check), "agreed" (another rank's check,
            shared through the process group) or "service" (a HALT signal).

    Example:
        try:
            train()
        except nanwatch.HaltError as halt:
            save_debug_checkpoint(halt.step)
            raise
    """

    def __init__(
        self,
        *,
        step: int,
        reason: str,
        finding: pb.Finding | None = None,
        source: str = "local",
        exit_code: int | None = None,
    ) -> None:
        code = halt_exit_code() if exit_code is None else exit_code
        super().__init__(code)
        self.step = step
        self.reason = reason
        self.finding = finding
        self.source = source
        self.exit_code = code

    def __str__(self) -> str:
        return f"nanwatch halted the run at step {self.step} before the optimizer update: {self.reason}"
