"""Folder that ``nanwatch run`` puts on PYTHONPATH so that its sitecustomize runs in every child process."""

from __future__ import annotations

from pathlib import Path

BOOTSTRAP_DIR = Path(__file__).resolve().parent

# Set to "1" in the processes that install the zero-code hooks.
AUTOWATCH_ENV = "NANWATCH_AUTOWATCH"
# Folder where a halted process leaves a marker file for ``nanwatch run``.
RUN_DIR_ENV = "NANWATCH_RUN_DIR"
# Consecutive non-finite updates a Watcher skips on every rank before it halts (the skip policy).
MAX_CONSECUTIVE_SKIPS_ENV = "NANWATCH_MAX_CONSECUTIVE_SKIPS"
