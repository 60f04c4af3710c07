"""Folder that ``nanwatch run`` puts on PYTHONPATH so that its sitecustomize runs in every child process."""

from __future__ import annotations

import os
from pathlib import Path

BOOTSTRAP_DIR = Path(__file__).resolve().parent

# Set to "1" in the processes that install the zero-code hooks.
AUTOWATCH_ENV = "NANWATCH_AUTOWATCH"
# Folder where a halted process leaves a marker file for ``nanwatch run``.
RUN_DIR_ENV = "NANWATCH_RUN_DIR"
# Consecutive non-finite updates a Watcher skips on every rank before it halts (the skip policy).
MAX_CONSECUTIVE_SKIPS_ENV = "NANWATCH_MAX_CONSECUTIVE_SKIPS"


def max_consecutive_skips_from_env() -> int:
    """Return $NANWATCH_MAX_CONSECUTIVE_SKIPS as an integer >= 0, 0 when unset; raise ValueError naming a bad value."""
    raw = os.environ.get(MAX_CONSECUTIVE_SKIPS_ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${MAX_CONSECUTIVE_SKIPS_ENV}={raw!r} is invalid; set an integer >= 0")
    return value
