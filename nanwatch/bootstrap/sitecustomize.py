"""Installs nanwatch's zero-code hooks in a process started by ``nanwatch run``.

Python imports ``sitecustomize`` at start-up from the first folder on sys.path
that has one; ``nanwatch run`` puts this folder first on PYTHONPATH. The hooks
are installed once torch is imported, so processes that never import torch pay
nothing. Any other sitecustomize that this one shadows is run afterwards.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_THIS_DIR = str(Path(__file__).resolve().parent)


def _install_autowatch() -> None:
    try:
        from nanwatch.client.autowatch import install_from_environment

        install_from_environment()
    except Exception as error:  # noqa: BLE001 - a broken install must not stop the training script
        print(f"nanwatch: zero-code hooks not installed: {error!r}", file=sys.stderr)


class _AfterTorchImport(importlib.abc.MetaPathFinder):
    """Runs the install right after the top-level torch package finishes importing."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _install_autowatch()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _run_shadowed_sitecustomize() -> None:
    search_path = [entry for entry in sys.path if os.path.abspath(entry or ".") != _THIS_DIR]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", search_path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get("NANWATCH_AUTOWATCH") == "1":
    if "torch" in sys.modules:
        _install_autowatch()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
_run_shadowed_sitecustomize()
