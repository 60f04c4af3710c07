"""A flag that nanwatch's own hooks read: while a step is replayed they stand aside."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_state = threading.local()


def replaying() -> bool:
    """Return True while this thread replays a step for localization."""
    return getattr(_state, "active", False)


@contextlib.contextmanager
def replay_guard() -> Iterator[None]:
    """Mark this thread as replaying until the block ends."""
    previous = replaying()
    _state.active = True
    try:
        yield
    finally:
        _state.active = previous
