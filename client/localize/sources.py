"""Names of torch operations and the user's source line that called them."""

from __future__ import annotations

import functools
import linecache
import os
import sys
import sysconfig
from pathlib import Path
from types import CodeType
from typing import Any

import torch

import nanwatch

# Frames in these folders are library code; the first frame outside them is the user's line.
_LIBRARY_DIRS = tuple(
    str(folder) + os.sep
    for folder in (Path(torch.__file__).resolve().parent, Path(nanwatch.__file__).resolve().parent,
                   Path(__file__).resolve().parents[1])
)
_STDLIB_DIR = str(Path(sysconfig.get_paths()["stdlib"]).resolve()) + os.sep


def op_name(func: Any) -> str:
    """Return a readable name for a function seen by a TorchFunctionMode: "torch.log", "Tensor.sum"."""
    name = getattr(func, "__name__", None) or repr(func)
    qualname = getattr(func, "__qualname__", name) or name
    module = getattr(func, "__module__", "") or ""
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"torch.nn.functional.{name}"
    if qualname.startswith("_VariableFunctionsClass.") or module in ("torch", "torch.functional"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


# Code objects of the functions that start a replay: frames outside them are not the model's code.
_BOUNDARIES: set[CodeType] = set()


def add_boundary(function: Any) -> None:
    """Stop caller_line at frames of this function: the code that called it is not the user's model."""
    _BOUNDARIES.add(function.__code__)


def caller_line() -> tuple[str, str]:
    """Return ("file.py:42", "the line's code") of the innermost frame outside torch, nanwatch and the stdlib.

    The search stops at a replay's entry function, so a model built only from torch
    modules (nn.Sequential) gets ("", "") rather than the line that ran the replay.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _BOUNDARIES:
            return "", ""
        filename = frame.f_code.co_filename
        if not _is_library(filename):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return f"{_display_path(filename)}:{frame.f_lineno}", code
        frame = frame.f_back
    return "", ""


@functools.lru_cache(maxsize=4096)
def _is_library(filename: str) -> bool:
    """Return True for torch, nanwatch and standard-library files, frozen modules included."""
    if filename.startswith("<"):
        return filename.startswith("<frozen")
    resolved = str(Path(filename).resolve())
    if resolved.startswith(_LIBRARY_DIRS):
        return True
    return resolved.startswith(_STDLIB_DIR) and "site-packages" not in resolved


def _display_path(filename: str) -> str:
    """Return filename relative to the working directory when it lies inside it, else unchanged."""
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative
