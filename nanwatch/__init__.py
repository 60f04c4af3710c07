"""nanwatch: training-run health checks for PyTorch.

The client (``Watcher``) needs torch; it is imported on first use so that the
service and the CLI run where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nanwatch.errors import DEFAULT_HALT_EXIT_CODE, HaltError

if TYPE_CHECKING:
    from nanwatch.client.watcher import Watcher

__all__ = ["DEFAULT_HALT_EXIT_CODE", "HaltError", "Watcher"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Watcher":
        from nanwatch.client.watcher import Watcher

        return Watcher
    raise AttributeError(f"module 'nanwatch' has no attribute {name!r}")
