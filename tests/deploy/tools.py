"""Locate the external tools that the deployment tests need, and the repository's deployment files.

A missing tool fails the test when the CI environment variable is set, so CI
cannot pass by skipping. On a developer machine without CI the test skips.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "nanwatch"
RULES_FILE = CHART_DIR / "files" / "prometheus-rules.yaml"
DASHBOARD_FILE = CHART_DIR / "files" / "dashboard.json"
RULES_TEST_FILE = REPO / "deploy" / "prometheus" / "nanwatch-rules.test.yaml"
JOB_EXAMPLE = REPO / "deploy" / "examples" / "training-job.yaml"
DOCKERFILE = REPO / "Dockerfile"

DEV_INSTALL_HINT = "install the dev extra: pip install -c requirements-lock.txt -e '.[service,dev]'"
PROMETHEUS_INSTALL_HINT = "install Debian's prometheus package: apt-get install -y --no-install-recommends prometheus"


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so a missing tool is an error)")
    pytest.skip(message)


def require_module(name: str, hint: str = DEV_INSTALL_HINT) -> ModuleType:
    """Import a Python module, or fail (CI) or skip (elsewhere) with the install hint."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        _missing(f"Python module {name} is not installed ({error}); {hint}")
        raise  # unreachable: _missing raises


def require_executable(name: str, hint: str) -> str:
    """Return the path of an executable, looking next to this Python first (venv scripts), then on PATH."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        _missing(f"executable {name} was not found next to {sys.executable} or on PATH; {hint}")
    return str(found)
