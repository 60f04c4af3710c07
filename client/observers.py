"""Observation of clip_grad_norm_ calls and GradScaler use, for runs that do not declare them to the Watcher."""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_clip_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_last_scaler: weakref.ref[Any] | None = None
_installed = False


def install() -> None:
    """Wrap torch.nn.utils.clip_grad_norm_ and GradScaler.scale once per process; later calls do nothing.

    NOTE: a script that bound clip_grad_norm_ by name before this ran (`from
    torch.nn.utils import clip_grad_norm_` at import time) keeps the unwrapped
    function, so its clipping is not observed; declaring clip_max_norm to the
    Watcher covers that case.
    """
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        wrapped = _wrap_clip(torch.nn.utils.clip_grad.clip_grad_norm_)
        torch.nn.utils.clip_grad_norm_ = wrapped
        torch.nn.utils.clip_grad.clip_grad_norm_ = wrapped
        torch.amp.GradScaler.scale = _wrap_scale(torch.amp.GradScaler.scale)


def add_clip_listener(listener: Any) -> None:
    """Register an object with on_clip(parameters, max_norm, total_norm); it is held weakly."""
    with _lock:
        _clip_listeners.add(listener)


def last_grad_scaler() -> Any | None:
    """Return the enabled GradScaler whose scale() ran last in this process, or None."""
    scaler = _last_scaler() if _last_scaler is not None else None
    return scaler


def _wrap_clip(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def clip_grad_norm_(parameters: torch.Tensor | Iterable[torch.Tensor], max_norm: float, *args: Any,
                        **kwargs: Any) -> torch.Tensor:
        if not isinstance(parameters, torch.Tensor):
            parameters = list(parameters)  # a generator can be read only once
        total = original(parameters, max_norm, *args, **kwargs)
        _notify_clip(parameters, max_norm, total)
        return total

    return clip_grad_norm_


def _notify_clip(parameters: torch.Tensor | list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    tensors = [parameters] if isinstance(parameters, torch.Tensor) else parameters
    for listener in list(_clip_listeners):
        try:
            listener.on_clip(tensors, float(max_norm), total)
        except Exception:  # noqa: BLE001 - an observer bug must not break the user's clipping
            logger.exception("nanwatch: recording a clip_grad_norm_ call failed")


def _wrap_scale(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def scale(self: Any, outputs: Any) -> Any:
        global _last_scaler
        if self.is_enabled():
            _last_scaler = weakref.ref(self)
        return original(self, outputs)

    return scale
