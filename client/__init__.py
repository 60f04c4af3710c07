"""The nanwatch training client: the Watcher and its checks (needs torch)."""

from __future__ import annotations

from nanwatch.client.watcher import Watcher

__all__ = ["Watcher"]
