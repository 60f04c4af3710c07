"""Validation of run ids, shared by the client and the service."""

from __future__ import annotations

import re

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RUN_ID_ENV = "NANWATCH_RUN_ID"


def validate_run_id(run_id: str) -> str:
    """Return run_id unchanged, or raise ValueError naming what is wrong with it."""
    if not run_id:
        raise ValueError("run_id is empty; pass 1-128 characters of [A-Za-z0-9._-]")
    if len(run_id) > 128:
        raise ValueError(f"run_id is {len(run_id)} characters long; the maximum is 128")
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} is invalid; use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id
